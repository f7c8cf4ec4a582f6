"""Make a Triton cache folder usable where it now lies (and, with --prune, small enough to carry).

    python scripts/relocate_triton_cache.py DIR [--prune]

Triton's file cache records every kernel's files in ``__grp__<kernel>.json`` by ABSOLUTE path and counts a
file that is not at that path as missing: a cache built in one folder (scripts/build_triton_cache.sh) and
copied to another misses everywhere. This rewrites those paths to DIR. ``--prune`` drops the intermediate
representations (.source, .ttir, .ttgir, .llir, .ptx): a launch needs only the cubin and the metadata
(.json), and a cache of ~160 kernels then fits the device tool's 64 MiB. Standard library only.
"""
import argparse
import json
import os
import sys

KEEP = (".cubin", ".json", ".so")


def relocate(folder: str, prune: bool = False) -> int:
    folder = os.path.abspath(folder)
    groups = 0
    for entry in sorted(os.listdir(folder)):
        sub = os.path.join(folder, entry)
        if not os.path.isdir(sub):
            continue
        for name in os.listdir(sub):
            path = os.path.join(sub, name)
            if prune and not name.startswith("__grp__") and not name.endswith(KEEP):
                os.remove(path)
        for name in os.listdir(sub):
            if not name.startswith("__grp__"):
                continue
            path = os.path.join(sub, name)
            with open(path) as f:
                data = json.load(f)
            children = {child: os.path.join(sub, os.path.basename(p)) for child, p in data.get("child_paths", {}).items()
                        if os.path.exists(os.path.join(sub, os.path.basename(p)))}
            with open(path, "w") as f:
                json.dump({"child_paths": children}, f)
            groups += 1
    return groups


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder")
    p.add_argument("--prune", action="store_true", help="keep only cubins, metadata and launchers")
    args = p.parse_args(argv)
    n = relocate(args.folder, args.prune)
    print(f"{args.folder}: {n} kernels relocated{' and pruned' if args.prune else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
