"""The `dbsam` command."""
import argparse
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="dbsam", description="DB-SAM for medical image segmentation")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="which kernels are built and available, and which backend each op uses")
    args = parser.parse_args(argv)
    if args.command == "info":
        from dbsam.ops.__main__ import info

        print(info())
    return 0


if __name__ == "__main__":
    sys.exit(main())
