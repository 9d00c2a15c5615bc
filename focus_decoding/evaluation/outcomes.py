"""What the refinement did to one uncertain prediction, as one character (the race and the reports share them)."""
from __future__ import annotations

# unmodified -> refined prediction
CO_CO, WR_CO, CO_WR, WR_SAME, WR_OTHER = "0", "1", "2", "3", "4"
CORRECT_AFTER = (CO_CO, WR_CO)  # codes whose refined prediction is right


def outcome(label: int, base: int, focus: int) -> str:
    """The code of one prediction: the label, the unmodified top-1 and the emitted (refined) top-1."""
    if base == label:
        return CO_CO if focus == label else CO_WR
    if focus == label:
        return WR_CO
    return WR_SAME if focus == base else WR_OTHER
