"""Console-script entry points (see `[project.scripts]`).

The commands' `main` functions return their results to Python callers (a summary, stats, a path); a console script
would pass that object to `sys.exit` and exit with status 1, so each entry point here drops it.
"""


def sft() -> None:
    from training.sft import main

    main()


def evaluate() -> None:
    from evaluation.__main__ import main

    main()


def generate_data() -> None:
    from processing.generate import main

    main()


def push_dataset() -> None:
    from processing.push_dataset import main

    main()
