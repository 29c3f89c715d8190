"""The command-line tools, each a thin entry over its stage's package (`main(argv)`), installed as the
console scripts of pyproject.toml's [project.scripts] and runnable as `python tools/NAME.py`."""
