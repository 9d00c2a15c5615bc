"""``python -m focus_decoding.harness ...``: the lm-eval command line with the ``focus-hf`` backend registered.

The backend itself is ``focus_decoding.text.harness`` (this path is kept because ``-m`` needs a module).
"""
from .text.harness import FocusLM, main  # noqa: F401 - importing registers focus-hf

if __name__ == "__main__":
    main()
