import sys

from .cli import main

if __name__ == "__main__":  # importing the package's submodules (docs tools do) must not run the CLI
    sys.exit(main())
