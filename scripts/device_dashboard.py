"""Ray's dashboard on a GPU machine that has a trimmed Ray and no package registry.

`ray job submit` needs the head's dashboard, and the dashboard needs ray[default]'s extras. On a
machine with a registry, download their wheels for the GPU machine's Python into a folder that
travels with the call (the team's `.device/`, not the repository: ~19 MB):

    python scripts/device_dashboard.py download .device/dashboard

then, on the GPU machine, before `ray start`:

    python3 scripts/device_dashboard.py install .device/dashboard

`install` puts only the wheels whose distribution the machine lacks into /tmp/site (where
`.device/setup.sh` puts Ray), once per machine.
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
from importlib import metadata

SITE = "/tmp/site"
# Not needed by the dashboard or `ray job submit` with a working_dir, and 13 MB together.
SKIP = ("ray-", "virtualenv-", "cryptography-", "py_spy-")


def download(folder: str, ray_version: str, python: str):
    os.makedirs(folder, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", f"ray[default]=={ray_version}",
                    "--python-version", python, "--only-binary=:all:", "--platform", "manylinux2014_x86_64",
                    "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux_2_28_x86_64",
                    "--platform", "any", "-d", folder], check=True)
    for w in glob.glob(os.path.join(folder, "*.whl")):
        if os.path.basename(w).startswith(SKIP):
            os.remove(w)
    print(f"{len(glob.glob(os.path.join(folder, '*.whl')))} wheels in {folder}")


def install(folder: str):
    marker = os.path.join(SITE, ".dashboard-ready")
    if os.path.exists(marker):
        return
    wheels, want = sorted(glob.glob(os.path.join(folder, "*.whl"))), []
    for w in wheels:
        name = os.path.basename(w).split("-")[0].replace("_", "-")
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            want.append(w)
    if want:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--target", SITE, *want], check=True)
    os.makedirs(SITE, exist_ok=True)
    open(marker, "w").close()
    print(f"dashboard extras: installed {len(want)} of {len(wheels)} wheels", file=sys.stderr)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Carry ray[default]'s dashboard extras to a GPU machine without a registry.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("download", help="Download the wheels (on a machine with a package registry).")
    d.add_argument("folder", help="Where to put the wheels.")
    d.add_argument("--ray-version", default="2.60.0", help="The Ray the GPU machine runs (default 2.60.0).")
    d.add_argument("--python", default="3.12", help="The GPU machine's Python version (default 3.12).")
    i = sub.add_parser("install", help="Install the wheels the machine lacks into /tmp/site (on the GPU machine).")
    i.add_argument("folder", help="The folder `download` filled.")
    a = ap.parse_args(argv)
    if a.cmd == "download":
        download(a.folder, a.ray_version, a.python)
    else:
        install(a.folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
