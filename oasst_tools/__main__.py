"""`python -m oasst_tools ...` (also what `accelerate launch -m oasst_tools train ...` runs)."""

from oasst_tools.cli import main

if __name__ == "__main__":
    main()
