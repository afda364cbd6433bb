import sys

from .cli import run_command_line

if __name__ == "__main__":
    sys.exit(run_command_line())
