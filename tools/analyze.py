"""`python -m tools.analyze` in a checkout: molere_analyze.py, which an install provides as the command
`molere-analyze` (and `python -m molere_analyze`) from any folder."""
from molere_analyze import *  # noqa: F401,F403 (the same functions, for code that imports tools.analyze)
from molere_analyze import main

if __name__ == "__main__":
    main()
