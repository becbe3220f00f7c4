"""Build the single-file plugin: one executable zipapp per entry point, in dist/.

    python3 scripts/build_plugin.py [--python /usr/bin/python3] [--out dist]

Why a plain zipapp (`python -m zipapp` format, built here by hand) and not shiv or pex: the
thin client path must cost little more than starting the interpreter, and every dependency is
pure Python. shiv and pex run a bootstrap on every start (it imports zipfile, json, hashlib or
more) and extract to ~/.shiv or ~/.pex on the first run, which needs a writable HOME, races
when a node starts many containers at once, and leaves root-owned caches behind. A plain
zipapp is imported in place by the interpreter's frozen zipimport: nothing is extracted,
nothing is written, and nothing is shared between concurrent runs.

What makes it fast:
- every module is byte-compiled next to its source (zipimport reads `mod.pyc`, never
  `__pycache__/`) as an unchecked hash-based pyc, so no mtime check (zip timestamps are local
  time at 2 s resolution) can send a run back to compiling source it cannot cache;
- entries are stored, not deflated: no decompression on the client path;
- the shebang runs the interpreter with `-I -S` (one argument, `-IS`): no site (no
  site-packages scan, no .pth files), no PYTHON* variables, no user site. Everything the
  plugin needs is in the file, and nothing installed on the host can shadow it.

The pycs match the interpreter that compiles them, so build with the Python the hosts run
(`--python`, default /usr/bin/python3); another 3.11+ version still works, compiling the
modules it imports on every run (slower, never wrong).
"""

from __future__ import annotations

import argparse
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENTRY_POINTS = {
    "ipam-da-consul": ("ipam_da_consul.cni.main", "main"),
    "ipam-da-consul-verbose": ("ipam_da_consul.cni.main", "main_verbose"),
    "ipam-da-consul-admin": ("ipam_da_consul.admin.cli", "main"),
    "ipam-da-consul-helper": ("ipam_da_consul.cni.helper.cli", "main"),
}
# Never needed at run time; each entry also costs a central-directory record that zipimport
# parses on the first import from the file.
_SKIP_DIRS = {"__pycache__", "tests", "test", "testing"}
_SKIP_SUFFIXES = {".pyc", ".pyo", ".pyi", ".so", ".exe"}
_FIXED_TIME = (2020, 1, 1, 0, 0, 0)  # reproducible archives
_NOT_SOURCE = (".git", ".venv", ".cache", "dist", "build", "*.egg-info", "__pycache__",
               ".pytest_cache", ".ruff_cache", ".hypothesis", "bench", "tests")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--python",
        default="/usr/bin/python3",
        help="interpreter of the target hosts: the shebang, and it compiles the pycs",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "dist")
    parser.add_argument(
        "--pip",
        default=sys.executable,
        help="a Python with pip, to fetch the pure-Python dependencies (default: this one)",
    )
    args = parser.parse_args(argv)
    python = shutil.which(args.python) or args.python
    check_target(python)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ipdc-build-") as tmp:
        site = Path(tmp) / "site"
        vendor(args.pip, site, Path(tmp) / "wheels")
        compile_tree(python, site)
        mains = Path(tmp) / "mains"
        for name, (module, func) in ENTRY_POINTS.items():
            (mains / name).mkdir(parents=True)
            (mains / name / "__main__.py").write_text(f"from {module} import {func}\n{func}()\n")
        compile_tree(python, mains)
        for name in ENTRY_POINTS:
            target = args.out / name
            write_zipapp(site, mains / name, target, python)
            print(f"built {target} ({target.stat().st_size // 1024} KiB)")


def check_target(python: str) -> None:
    probe = "import sys; assert sys.version_info >= (3, 11), sys.version"
    if subprocess.run([python, "-c", probe], capture_output=True).returncode != 0:
        sys.exit(f"build-plugin: {python} is not a Python 3.11 or newer (use --python)")


def vendor(pip_python: str, site: Path, wheels: Path) -> None:
    """The project and its dependencies, pure-Python wheels only, unpacked into `site`."""
    pip = [pip_python, "-m", "pip", "--disable-pip-version-check", "-q"]
    # From a copy: setuptools builds in the source folder (build/, *.egg-info), and the
    # worktree must not be left with a stale build/lib another tool might pick up.
    source = wheels.parent / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*_NOT_SOURCE))
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(wheels), str(source)], check=True)
    (project,) = wheels.glob("ipam_da_consul-*.whl")
    # `--platform any --implementation py`: only py3-none-any wheels, so no compiled extension
    # (charset-normalizer's mypyc build) that zipimport could not load, and one file that runs
    # on any architecture.
    subprocess.run(
        [*pip, "install", "--target", str(site), "--no-compile", "--only-binary=:all:",
         "--platform", "any", "--implementation", "py", "--python-version", "3.11",
         str(project)],
        check=True,
    )
    for junk in site.rglob("*"):
        if junk.is_dir() and junk.name in _SKIP_DIRS:
            shutil.rmtree(junk, ignore_errors=True)
    bin_dir = site / "bin"  # console scripts pip wrote for the target: not ours to ship
    if bin_dir.exists():
        shutil.rmtree(bin_dir)
    (site / "certifi" / "core.py").write_text(_CERTIFI_CORE)


# requests calls certifi.where() as it is imported. Inside a zipapp the stock certifi then
# extracts cacert.pem to a temporary file on every in-process call: a write per call, a failed
# call where no temporary folder is writable, and a file left behind whenever the runtime kills
# the plugin. Like Debian's python3-certifi, this answers with the host's CA bundle, and
# extracts the bundled copy only on a host that has none. (Consul over TLS normally names its
# CA anyway: ipam.consul_ca_file.)
_CERTIFI_CORE = '''"""certifi.where() for the single-file plugin (see scripts/build_plugin.py)."""

import os

_SYSTEM_BUNDLES = (
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
)
_extracted = None


def where() -> str:
    global _extracted
    for path in _SYSTEM_BUNDLES:
        if os.path.isfile(path):
            return path
    if _extracted is None:
        import atexit
        from importlib.resources import as_file, files

        _extracted = as_file(files("certifi").joinpath("cacert.pem"))
        atexit.register(_extracted.__exit__, None, None, None)
    return str(_extracted.__enter__())


def contents() -> str:
    with open(where(), encoding="ascii") as fh:
        return fh.read()
'''


def compile_tree(python: str, site: Path) -> None:
    """`mod.pyc` beside every `mod.py`, compiled by the target interpreter (its magic number)."""
    script = (
        "import py_compile, sys\n"
        "for path in sys.argv[1:]:\n"
        "    py_compile.compile(path, cfile=path + 'c', doraise=True,\n"
        "        invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)\n"
    )
    sources = [str(p) for p in sorted(site.rglob("*.py"))]
    subprocess.run([python, "-I", "-c", script, *sources], check=True)


def write_zipapp(site: Path, main_dir: Path, target: Path, python: str) -> None:
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(f"#!{python} -IS\n".encode())
        with zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED) as zf:
            files = [(main_dir, p) for p in sorted(main_dir.iterdir())]
            files += [(site, p) for p in sorted(site.rglob("*"))]
            for base, path in files:
                rel = path.relative_to(base).as_posix()
                if path.is_dir() or _skipped(path):
                    continue
                _add(zf, rel, path.read_bytes())
                if path.suffix == ".py" and path.with_suffix(".pyc").exists():
                    _add(zf, rel + "c", path.with_suffix(".pyc").read_bytes())
    tmp.chmod(0o755)
    # Atomic: a runtime executing the old file while we rebuild never sees half a zip.
    os.replace(tmp, target)


def _skipped(path: Path) -> bool:
    return path.suffix in _SKIP_SUFFIXES or any(p in _SKIP_DIRS for p in path.parts)


def _add(zf: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, _FIXED_TIME)
    info.external_attr = (stat.S_IFREG | 0o644) << 16
    zf.writestr(info, data)


if __name__ == "__main__":
    main()
