"""Build the Debian package from the single-file build: dist/ipam-da-consul_<version>_all.deb.

    bash scripts/build-deb.sh [--version V] [--out DIR] [--single-file DIR] [--no-lintian]

What goes where (docs/packaging.md says why):
- the four zipapps of scripts/build_plugin.py in /opt/cni/bin, CNI's plugin folder that
  containerd, CRI-O, Nomad and Podman search by default; the plugin and its verbose flavour
  also linked from /usr/lib/cni (Debian's containernetworking-plugins folder), the admin CLI
  from /usr/bin, the helper from /usr/sbin;
- the helper's socket and service and two timers (pool usage for node_exporter, reconcile)
  in /lib/systemd/system, their settings in /etc/default/ipam-da-consul, the verbose log's
  logrotate rule, all from deploy/;
- man pages (the admin CLI's and the helper's made from their own --help), the copyright file
  (the project's licenses and those of every library the zipapps bundle, read from the
  zipapps themselves), the changelog, docs/packaging.md as README.Debian;
- the alert rules and the Grafana dashboard in /usr/share/ipam-da-consul.

The maintainer scripts (deploy/debian/postinst, prerm, postrm) do what debhelper's
dh_installsystemd would. Built with dpkg-deb alone (no source package, no debhelper): the
package is made of files the project already builds and tests. Then lintian checks it.
Reproducible: every file's time and the archive's are SOURCE_DATE_EPOCH (default: the last
commit's time).
"""

from __future__ import annotations

import argparse
import email.message
import email.parser
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from email.utils import formatdate
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEB = ROOT / "deploy" / "debian"
UNITS = ROOT / "deploy" / "systemd"
PACKAGE = "ipam-da-consul"
NAMES = (
    "ipam-da-consul", "ipam-da-consul-verbose", "ipam-da-consul-admin", "ipam-da-consul-helper"
)
BIN = "opt/cni/bin"
# Runtimes that only look in Debian's CNI folder find the plugin there too.
LINKED_CNI = ("ipam-da-consul", "ipam-da-consul-verbose")
UNIT_FILES = (
    "ipam-da-consul-helper.socket",
    "ipam-da-consul-helper.service",
    "ipam-da-consul-usage.service",
    "ipam-da-consul-usage.timer",
    "ipam-da-consul-reconcile.service",
    "ipam-da-consul-reconcile.timer",
)
CONFFILES = ("etc/default/ipam-da-consul", "etc/logrotate.d/ipam-da-consul")
MAINTAINER = "ipam-da-consul maintainers <maintainers@users.noreply.r-seed-857f7437.example>"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--version", help="package version (default: the project's)")
    parser.add_argument("--out", type=Path, default=ROOT / "dist")
    parser.add_argument(
        "--single-file", type=Path, metavar="DIR",
        help="the four executables of scripts/build_plugin.py (default: build them now)",
    )
    parser.add_argument("--python", default="/usr/bin/python3",
                        help="the hosts' interpreter, for a build made now (build_plugin.py)")
    parser.add_argument("--no-lintian", action="store_true", help="do not run lintian after")
    parser.add_argument(
        "--compression", choices=("xz", "gzip", "none"), default="xz",
        help="of the data (default xz, dpkg-deb's: the four zipapps are alike, and xz's 8 MiB "
        "window makes 24 MiB of them 1.5 MiB); the others build faster, for tests",
    )
    args = parser.parse_args(argv)
    if shutil.which("dpkg-deb") is None:
        sys.exit("build-deb: dpkg-deb is missing (apt-get install dpkg)")
    version = args.version or project_version()
    if not re.fullmatch(r"[0-9][A-Za-z0-9.+~]*", version):
        sys.exit(f"build-deb: {version!r} is not a native Debian version")
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH") or commit_time())
    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / f"{PACKAGE}_{version}_all.deb"
    with tempfile.TemporaryDirectory(prefix="ipdc-deb-") as tmp:
        single = args.single_file
        if single is None:
            single = Path(tmp) / "single-file"
            subprocess.run([sys.executable, str(ROOT / "scripts" / "build_plugin.py"),
                            "--python", args.python, "--out", str(single)], check=True)
        stage = Path(tmp) / "stage"
        build_tree(stage, single, version, epoch)
        done = subprocess.run(
            ["dpkg-deb", "--root-owner-group", f"-Z{args.compression}", "--build", str(stage),
             str(target)],
            env={**os.environ, "SOURCE_DATE_EPOCH": str(epoch)}, capture_output=True, text=True,
        )
        if done.returncode != 0:
            sys.exit(f"build-deb: dpkg-deb failed: {done.stderr}")
    print(f"built {target} ({target.stat().st_size // 1024} KiB)")
    if args.no_lintian:
        return 0
    return run_lintian(target)


def project_version() -> str:
    text = (ROOT / "src" / "ipam_da_consul" / "__init__.py").read_text()
    found = re.search(r'^__version__ = "([^"]+)"', text, re.M)
    assert found, "no __version__ in src/ipam_da_consul/__init__.py"
    return found.group(1)


def commit_time() -> int:
    done = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%ct"],
                          capture_output=True, text=True)
    return int(done.stdout.strip()) if done.returncode == 0 and done.stdout.strip() else 0


def commit() -> str:
    done = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"],
                          capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def run_lintian(deb: Path) -> int:
    """lintian's verdict, every tag shown (info included); errors and warnings fail. The
    overridden tags are not shown (lintian 2.116 exits 2 with --show-overrides whenever one
    is an error): their justifications are deploy/debian/ipam-da-consul.lintian-overrides."""
    if shutil.which("lintian") is None:
        print("build-deb: lintian is missing (apt-get install lintian): not checked",
              file=sys.stderr)
        return 0
    done = subprocess.run(
        ["lintian", "--display-info", "--fail-on", "error,warning", str(deb)],
        capture_output=True, text=True,
    )
    print(f"lintian {deb.name}: exit {done.returncode}")
    sys.stdout.write(done.stdout)
    sys.stderr.write(done.stderr)
    return done.returncode


# -- the tree ------------------------------------------------------------------------------------
def build_tree(stage: Path, single: Path, version: str, epoch: int) -> None:
    date = time.strftime("%Y-%m-%d", time.gmtime(epoch))
    bindir = stage / BIN
    bindir.mkdir(parents=True)
    for name in NAMES:
        install(single / name, bindir / name, 0o755)
    for name in LINKED_CNI:
        link(stage / "usr/lib/cni" / name, f"/{BIN}/{name}")
    link(stage / "usr/bin/ipam-da-consul-admin", f"/{BIN}/ipam-da-consul-admin")
    # A daemon's place, for its --help and man page; systemd runs it from /opt/cni/bin.
    link(stage / "usr/sbin/ipam-da-consul-helper", f"/{BIN}/ipam-da-consul-helper")
    for unit in UNIT_FILES:
        install(UNITS / unit, stage / "lib/systemd/system" / unit)
    install(DEB / "ipam-da-consul.default", stage / "etc/default/ipam-da-consul")
    install(DEB / "ipam-da-consul.logrotate", stage / "etc/logrotate.d/ipam-da-consul")
    share = stage / "usr/share" / PACKAGE
    install(ROOT / "deploy/prometheus/ipam-da-consul.rules.yml",
            share / "prometheus/ipam-da-consul.rules.yml")
    install(ROOT / "deploy/grafana/ipam-da-consul.json", share / "grafana/ipam-da-consul.json")
    install(DEB / "ipam-da-consul.lintian-overrides",
            stage / "usr/share/lintian/overrides" / PACKAGE)

    man = stage / "usr/share/man"
    plugin_page = (DEB / "ipam-da-consul.8").read_text()
    gz(man / "man8/ipam-da-consul.8.gz",
       plugin_page.replace("@DATE@", date).replace("@VERSION@", version).encode(), epoch)
    gz(man / "man8/ipam-da-consul-verbose.8.gz", b".so man8/ipam-da-consul.8\n", epoch)
    gz(man / "man1/ipam-da-consul-admin.1.gz", admin_page(single, version, date).encode(), epoch)
    gz(man / "man8/ipam-da-consul-helper.8.gz", helper_page(single, version, date).encode(),
       epoch)

    doc = stage / "usr/share/doc" / PACKAGE
    doc.mkdir(parents=True)
    (doc / "copyright").write_text(copyright_text(single / "ipam-da-consul"))
    install(ROOT / "docs/packaging.md", doc / "README.Debian")
    gz(doc / "changelog.gz", changelog(version, epoch).encode(), epoch)

    control = stage / "DEBIAN"
    control.mkdir()
    for script in ("postinst", "prerm", "postrm"):
        install(DEB / script, control / script, 0o755)
    (control / "conffiles").write_text("".join(f"/{c}\n" for c in CONFFILES))
    (control / "md5sums").write_text(md5sums(stage))
    size = sum(p.stat().st_size for p in stage.rglob("*")
               if p.is_file() and not p.is_symlink() and control not in p.parents)
    (control / "control").write_text(
        (DEB / "control.in").read_text()
        .replace("@VERSION@", version)
        .replace("@MAINTAINER@", MAINTAINER)
        .replace("@INSTALLED_SIZE@", str((size + 1023) // 1024))
    )
    for path in [stage, *stage.rglob("*")]:
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o755)
        os.utime(path, (epoch, epoch), follow_symlinks=False)


def install(source: Path, target: Path, mode: int = 0o644) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    target.chmod(mode)


def link(path: Path, target: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)


def gz(path: Path, data: bytes, epoch: int) -> None:
    """gzip -9n: no name, the fixed time (lintian wants both, and so do reproducible builds)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as raw, gzip.GzipFile("", "wb", 9, raw, mtime=epoch) as out:
        out.write(data)
    path.chmod(0o644)


def md5sums(stage: Path) -> str:
    rows = []
    for path in sorted(stage.rglob("*")):
        rel = path.relative_to(stage).as_posix()
        if rel.startswith("DEBIAN/") or path.is_symlink() or not path.is_file():
            continue
        rows.append(f"{hashlib.md5(path.read_bytes()).hexdigest()}  {rel}\n")
    return "".join(rows)


def changelog(version: str, epoch: int) -> str:
    return (
        f"{PACKAGE} ({version}) unstable; urgency=medium\n\n"
        f"  * Built by scripts/build-deb.sh from commit {commit()}.\n\n"
        f" -- {MAINTAINER}  {formatdate(epoch)}\n"
    )


# -- man pages -----------------------------------------------------------------------------------
def help_text(exe: Path, *args: str) -> str:
    return help_texts(exe, [list(args)])[0]


# Runs a zipapp's entry point once per argument list in one interpreter (each start imports
# the CLI anew: seconds on a loaded host for a dozen commands), capturing what --help prints.
_HELPS = """
import contextlib, io, json, runpy, sys
zipapp, runs = sys.argv[1], json.loads(sys.argv[2])
sys.path.insert(0, zipapp)
out = []
for args in runs:
    sys.argv = [zipapp, *args, "--help"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
        runpy.run_path(zipapp, run_name="__main__")
    out.append(buf.getvalue())
print(json.dumps(out))
"""


def help_texts(exe: Path, runs: list[list[str]]) -> list[str]:
    """What `exe ARGS --help` prints, for each ARGS: the zipapp run by its own interpreter (its
    shebang's), as one process."""
    with open(exe, "rb") as fh:
        interpreter = fh.readline().decode().removeprefix("#!").split()
    done = subprocess.run([*interpreter, "-c", _HELPS, str(exe), json.dumps(runs)],
                          capture_output=True, text=True, timeout=300, check=True,
                          env={"PATH": "/usr/bin:/bin", "COLUMNS": "80"})
    texts: list[str] = json.loads(done.stdout)
    return texts


def roff_literal(text: str) -> str:
    """Text shown as it is (.nf): backslashes and hyphens escaped, no line read as a request."""
    out = []
    for line in text.rstrip("\n").splitlines():
        line = line.replace("\\", "\\e").replace("-", "\\-")
        out.append("\\&" + line if line.startswith((".", "'")) else line)
    return ".nf\n" + "\n".join(out) + "\n.fi\n"


def admin_page(single: Path, version: str, date: str) -> str:
    exe = single / "ipam-da-consul-admin"
    top = help_text(exe)
    # The subcommands, as the top-level help lists them under COMMAND.
    commands = re.findall(r"^    ([a-z][a-z-]*) ", top, re.M)
    helps = dict(zip(commands, help_texts(exe, [[c] for c in commands]), strict=True))
    page = [
        f'.TH IPAM-DA-CONSUL-ADMIN 1 "{date}" "ipam-da-consul {version}" "User Commands"',
        ".SH NAME",
        "ipam-da-consul-admin \\- manage the address pools of ipam-da-consul in Consul KV",
        ".SH SYNOPSIS",
        ".B ipam-da-consul-admin",
        "[\\fIOPTIONS\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR]",
        ".SH DESCRIPTION",
        "The operator CLI of the ipam-da-consul CNI IPAM plugin. What follows is its own",
        "\\fB\\-\\-help\\fR, then each command's.",
        ".PP",
        roff_literal(top).rstrip("\n"),
        ".SH COMMANDS",
    ]
    for command in commands:
        page += [f".SS {command}", roff_literal(helps[command]).rstrip("\n")]
    page += [
        ".SH ENVIRONMENT",
        "\\fBCONSUL_HTTP_ADDR\\fR, \\fBCONSUL_HTTP_TOKEN_FILE\\fR, \\fBCONSUL_HTTP_TOKEN\\fR,",
        "\\fBCONSUL_CACERT\\fR, \\fBCONSUL_CLIENT_CERT\\fR, \\fBCONSUL_CLIENT_KEY\\fR: as the",
        "consul CLI reads them. The timers of the Debian package take them from",
        "\\fI/etc/default/ipam-da-consul\\fR.",
        ".SH SEE ALSO",
        ".BR ipam-da-consul (8),",
        ".BR ipam-da-consul-helper (8)",
    ]
    return "\n".join(page) + "\n"


def helper_page(single: Path, version: str, date: str) -> str:
    text = help_text(single / "ipam-da-consul-helper")
    page = [
        f'.TH IPAM-DA-CONSUL-HELPER 8 "{date}" "ipam-da-consul {version}" "System Administration"',
        ".SH NAME",
        "ipam-da-consul-helper \\- long-lived helper serving ipam-da-consul's CNI calls",
        ".SH SYNOPSIS",
        ".B ipam-da-consul-helper",
        "[\\fIOPTIONS\\fR]",
        ".SH DESCRIPTION",
        "Keeps the plugin's libraries loaded and its pools in memory, watched with Consul",
        "blocking queries, and serves the plugin's calls on a unix socket that only root may use.",
        "Optional: without it every call runs in the plugin process, with the same results.",
        "The Debian package starts it through \\fIipam\\-da\\-consul\\-helper.socket\\fR on the",
        "first call; its options are \\fBHELPER_ARGS\\fR in",
        "\\fI/etc/default/ipam\\-da\\-consul\\fR.",
        ".PP",
        roff_literal(text).rstrip("\n"),
        ".SH FILES",
        ".TP",
        ".I /run/ipam-da-consul/helper.sock",
        "The socket (systemd's, when socket-activated).",
        ".TP",
        ".I /var/lib/ipam-da-consul",
        "The state folder: each attachment's writes, DELs taken over while Consul was away.",
        ".TP",
        ".I /etc/default/ipam-da-consul",
        "\\fBHELPER_ARGS\\fR, e.g. \\fB\\-\\-metrics\\-address 127.0.0.1:9464\\fR for Prometheus.",
        ".SH SEE ALSO",
        ".BR ipam-da-consul (8),",
        ".BR ipam-da-consul-admin (1)",
    ]
    return "\n".join(page) + "\n"


# -- copyright -----------------------------------------------------------------------------------
# The project's own licenses. Apache-2.0 is in Debian's common licenses; MIT is not.
MIT_TEXT = """\
 Permission is hereby granted, free of charge, to any person obtaining a copy
 of this software and associated documentation files (the "Software"), to deal
 in the Software without restriction, including without limitation the rights
 to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
 copies of the Software, and to permit persons to whom the Software is
 furnished to do so, subject to the following conditions:
 .
 The above copyright notice and this permission notice shall be included in
 all copies or substantial portions of the Software.
 .
 THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
 IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
 FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
 AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
 LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
 OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
 SOFTWARE."""
BSD_2_TEXT = """\
 Redistribution and use in source and binary forms, with or without
 modification, are permitted provided that the following conditions are met:
 .
 1. Redistributions of source code must retain the above copyright notice,
    this list of conditions and the following disclaimer.
 2. Redistributions in binary form must reproduce the above copyright notice,
    this list of conditions and the following disclaimer in the documentation
    and/or other materials provided with the distribution.
 .
 THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS"
 AND ANY EXPRESS OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE
 IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE
 ARE DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT HOLDER OR CONTRIBUTORS BE
 LIABLE FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR
 CONSEQUENTIAL DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF
 SUBSTITUTE GOODS OR SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS
 INTERRUPTION) HOWEVER CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER IN
 CONTRACT, STRICT LIABILITY, OR TORT (INCLUDING NEGLIGENCE OR OTHERWISE)
 ARISING IN ANY WAY OUT OF THE USE OF THIS SOFTWARE, EVEN IF ADVISED OF THE
 POSSIBILITY OF SUCH DAMAGE."""
COMMON = {
    "Apache-2.0": "/usr/share/common-licenses/Apache-2.0",
    "MPL-2.0": "/usr/share/common-licenses/MPL-2.0",
}
# Licenses a library's expression may name without shipping their text: standalone paragraphs.
STANDALONE = {"Apache-2.0", "MIT", "MPL-2.0", "BSD-2-Clause"}
# Metadata's License field, where a dist gives prose or a classifier instead of an SPDX name.
_SPDX = {
    "apache 2.0": "Apache-2.0", "apache-2.0": "Apache-2.0", "apache software license":
    "Apache-2.0", "mit": "MIT", "mit license": "MIT", "mozilla public license 2.0 (mpl 2.0)":
    "MPL-2.0", "mpl-2.0": "MPL-2.0", "bsd-3-clause": "BSD-3-clause", "bsd license":
    "BSD-3-clause",
}


def copyright_text(zipapp: Path) -> str:
    """DEP-5: the project, then each library the zipapps bundle (its license as the library
    ships it, or Debian's common copy of it)."""
    out = [
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/",
        f"Upstream-Name: {PACKAGE}",
        "Comment: The four executables in /opt/cni/bin are zipapps (scripts/build_plugin.py)",
        " that bundle the pure-Python libraries below, each under its own license. Their",
        " Files patterns are paths inside the zipapps.",
        "",
        "Files: *",
        "Copyright: ipam-da-consul maintainers",
        "License: Apache-2.0 or MIT",
        "",
    ]
    for dist in bundled(zipapp):
        out += [f"Files: {dist['files']}", f"Copyright: {dist['copyright']}",
                f"License: {dist['license']}"]
        if dist["text"]:
            out += [dist["text"]]
        out.append("")
    out += ["License: Apache-2.0",
            " On Debian systems, the full text of the Apache License, Version 2.0 can be",
            f" found in {COMMON['Apache-2.0']}.", ""]
    out += ["License: MIT", MIT_TEXT, ""]
    out += ["License: MPL-2.0",
            " On Debian systems, the full text of the Mozilla Public License, Version 2.0",
            f" can be found in {COMMON['MPL-2.0']}.", ""]
    out += ["License: BSD-2-Clause", BSD_2_TEXT, ""]
    return "\n".join(out).rstrip("\n") + "\n"


def bundled(zipapp: Path) -> list[dict[str, str]]:
    dists = []
    with zipfile.ZipFile(zipapp) as zf:
        names = zf.namelist()
        infos = sorted({n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")})
        for info in infos:
            meta = email.parser.HeaderParser().parsestr(zf.read(f"{info}/METADATA").decode())
            name = str(meta["Name"])
            if name.replace("_", "-").lower() == PACKAGE:
                continue
            license_name = spdx(meta)
            files = [n for n in names if n.startswith(f"{info}/") and
                     re.search(r"(LICEN[CS]E|COPYING|NOTICE)", n.rsplit("/", 1)[-1], re.I)]
            texts = [zf.read(f).decode("utf-8", "replace") for f in sorted(files)]
            holders = sorted({m.strip().rstrip(".") for t in texts
                              for m in re.findall(r"^\s*(Copyright\b.*)$", t, re.M)
                              if not re.search(r"notice|owner|holder", m, re.I)})
            # Apache-2.0's own text is Debian's common copy (lintian insists); a NOTICE stays.
            texts = [t for t in texts if not re.search(r"Apache License\s+Version 2\.0", t)]
            if not texts and not set(re.split(r" (?:and|or) ", license_name)) <= STANDALONE:
                raise SystemExit(f"build-deb: {name} ships no text of {license_name}")
            module = name.replace("-", "_").lower()
            top = sorted({n.split("/")[0] for n in names
                          if n.split("/")[0] in (module, f"{module}.py")})
            dists.append({
                "files": " ".join(f"{t}/*" if "." not in t else t for t in top) or f"{info}/*",
                "copyright": "\n ".join(h.removeprefix("Copyright").strip(" :(c)©")
                                        for h in holders) or f"the {name} authors",
                "license": license_name,
                "text": "\n".join(" " + (line.rstrip() or ".") for line in
                                  "\n\n".join(texts).strip("\n").splitlines()),
            })
    return dists


def spdx(meta: email.message.Message) -> str:
    expression = meta.get("License-Expression")
    if expression:
        return str(expression).replace(" OR ", " or ").replace(" AND ", " and ")
    raw = str(meta.get("License") or "").strip()
    if raw.lower() in _SPDX:
        return _SPDX[raw.lower()]
    for classifier in meta.get_all("Classifier") or []:
        leaf = str(classifier).rsplit("::", 1)[-1].strip().lower()
        if str(classifier).startswith("License ::") and leaf in _SPDX:
            return _SPDX[leaf]
    raise SystemExit(f"build-deb: cannot tell the license of {meta['Name']}: {raw[:80]!r}")


if __name__ == "__main__":
    sys.exit(main())
