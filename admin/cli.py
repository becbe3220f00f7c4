"""`ipam-da-consul-admin`: the command-line entry point for the people who run the pools.

Parses the command line, runs one subcommand, and turns every expected failure into one line
on stderr and an exit status; results alone go to stdout.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from loguru import logger

from ..cni.hardening import harden
from ..consul import ConsulError, ConsulUnavailable, NotConsul, UnsafeKey
from . import commands, housekeeping
from . import reconcile as rec
from .errors import CONSUL, PROBLEMS, STATE, USAGE, AdminError
from .output import Progress
from .rangespec import RANGE_SPEC_HELP
from .settings import DEFAULT_ADDR, DEFAULT_PREFIX, DEFAULT_TIMEOUT, resolve

PROG = "ipam-da-consul-admin"

DESCRIPTION = """\
Manage the ipam-da-consul address pools kept in Consul KV: create pools, list them, show
their usage and allocations, release an address, check pools for problems, and release this
host's allocations of containers the runtime no longer has (reconcile).

A pool is the key <prefix><pool> holding a JSON array of IP ranges, plus the folder
<prefix><pool>/ with one key per allocated address, named after the address and holding
{"target": "<container id>", ...}. Every write is a compare-and-set, so the admin tool never
overwrites a change the plugin (or another operator) made in the meantime.
"""

EPILOG = f"""\
Consul connection (options may come before or after the subcommand):
  servers   --consul, else CONSUL_HTTP_ADDR (http:// added when it has no scheme, https://
            with CONSUL_HTTP_SSL=true), else {DEFAULT_ADDR}
  token     --token-file (FILE, or - for stdin), else CONSUL_HTTP_TOKEN_FILE, else
            CONSUL_HTTP_TOKEN; --token TOKEN works but shows it in the process list
  TLS       --ca-file / --cert-file / --key-file, else CONSUL_CACERT / CONSUL_CLIENT_CERT /
            CONSUL_CLIENT_KEY

Exit status:
  0  success (check: no problems)
  {PROBLEMS}  check found problems
  {USAGE}  bad command line or input (nothing written)
  {CONSUL}  Consul could not be reached, refused the request (e.g. HTTP 403) or answered badly
  {STATE}  KV state prevents the action: pool missing or already there, allocation absent or
     changed meanwhile (nothing written); reconcile: some releases failed

Container IDs (--target, live lists): the full ID, or a unique prefix of at least 6 characters.

Examples:
  {PROG} create blue --range 10.0.20.0/23,10.0.21.100-10.0.21.150,gw=10.0.20.1
  {PROG} list
  {PROG} usage blue
  {PROG} usage --prometheus > ipam.tmp && mv ipam.tmp ipam.prom   # in the textfile folder
  {PROG} allocations blue --json
  {PROG} release blue 10.0.21.103 --target 0f3c9a...
  {PROG} check
  podman ps -a -q --no-trunc | {PROG} reconcile --live-ids - --apply
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, like every other failure, instead of argparse's usage block.
        self.exit(USAGE, f"{PROG}: error: {message} (see `{self.prog} --help`)\n")

    def _parse_optional(self, arg_string: str) -> Any:
        # `-/NAME`, the name column of a container without a namespace (Podman passes its
        # containers' names as K8S_POD_NAME alone), is a name to look up, never an option.
        if arg_string.startswith("-/"):
            return None
        return super()._parse_optional(arg_string)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("the timeout must be more than 0 seconds")
    return value


def _percent(text: str) -> float:
    try:
        value = float(text.rstrip("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a percentage") from None
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError("a percentage is between 0 and 100")
    return value


def _finder_options(p: argparse.ArgumentParser, func: Callable[..., int]) -> None:
    p.add_argument("--pool", action="append", default=[], metavar="NAME", help="only this pool")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=func)


def _connection_options() -> argparse.ArgumentParser:
    # SUPPRESS: an option given only before the subcommand is not reset by the subparser.
    p = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    g = p.add_argument_group("Consul connection")
    g.add_argument(
        "--consul",
        action="append",
        metavar="URL",
        help="Consul HTTP address, e.g. http://10.20.30.40:8500; repeat for more servers, "
        f"tried in order (default: CONSUL_HTTP_ADDR, else {DEFAULT_ADDR})",
    )
    g.add_argument(
        "--token",
        metavar="TOKEN",
        help="Consul ACL token; visible to other local users in the process list, so it warns: "
        "prefer --token-file",
    )
    g.add_argument(
        "--token-file",
        metavar="FILE",
        help="file holding the ACL token, or - to read it from stdin (default: "
        "CONSUL_HTTP_TOKEN_FILE, else CONSUL_HTTP_TOKEN)",
    )
    g.add_argument("--ca-file", metavar="FILE", help="CA bundle for HTTPS (default: CONSUL_CACERT)")
    g.add_argument(
        "--cert-file",
        metavar="FILE",
        help="client certificate for HTTPS (default: CONSUL_CLIENT_CERT)",
    )
    g.add_argument(
        "--key-file", metavar="FILE", help="client certificate key (default: CONSUL_CLIENT_KEY)"
    )
    g.add_argument("--datacenter", metavar="DC", help="Consul datacenter (default: the agent's)")
    g.add_argument(
        "--prefix",
        metavar="PREFIX",
        help="KV prefix the pools live under, as the plugin's kv_prefix "
        f"(default: {DEFAULT_PREFIX})",
    )
    g.add_argument(
        "--timeout",
        type=_positive,
        metavar="SECONDS",
        help="time budget for the whole command, retries across servers included "
        f"(default: {DEFAULT_TIMEOUT:g})",
    )
    g.add_argument("-v", "--verbose", action="store_true", help="log each Consul request on stderr")
    return p


def build_parser() -> argparse.ArgumentParser:
    common = _connection_options()
    parser = _Parser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EPILOG,
        parents=[common],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # Typed loosely: argparse's stubs tie subparsers to the parent's class, _Parser.
    sub: Any = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help,
            description=description,
            parents=[common],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    p = add(
        "create",
        "create a pool (or replace its ranges with --force)",
        "Create pool POOL: validate the ranges with the plugin's own schema, then write the key\n"
        "<prefix>POOL (a JSON array of {subnet, rangeStart, rangeEnd, gateway}, normalised:\n"
        "subnet without host bits, explicit bounds) and the folder key <prefix>POOL/.\n"
        "An existing pool is left alone unless --force, which replaces its ranges with a\n"
        "compare-and-set and keeps its allocations (a warning names those that no longer fit).\n"
        "Invalid or overlapping ranges are refused and nothing is written, and so are ranges\n"
        "that share addresses with another pool's, unless --allow-overlap.",
    )
    p.add_argument("pool", metavar="POOL", help="pool name: one KV path segment")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--range",
        action="append",
        metavar="SPEC",
        help=f"a range, repeatable, in pool order: {RANGE_SPEC_HELP}",
    )
    src.add_argument(
        "--ranges-json",
        metavar="FILE",
        help="read the JSON array of IP Range objects from FILE ('-' for stdin)",
    )
    p.add_argument("--force", action="store_true", help="replace the ranges of an existing pool")
    p.add_argument(
        "--allow-overlap",
        action="store_true",
        help="write it even if another pool hands out some of its addresses (pools that never "
        "serve the same network segment); a warning names them",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the value that would be written; write nothing",
    )
    p.set_defaults(func=commands.create)

    p = add(
        "list",
        "list the pools with their range count and capacity",
        "List the pools: keys directly under the prefix that hold an array of IP ranges, with\n"
        "their number of ranges, capacity (allocatable addresses: network, broadcast and\n"
        "gateway excluded) and subnets. Other keys under the prefix are named on stderr.",
    )
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=commands.list_pools)

    p = add(
        "usage",
        "show allocated / free addresses per range",
        "Show, per range of each pool, its size, the addresses allocated, those free and the\n"
        "percentage used. Without POOL, every pool under the prefix. An allocation counts by\n"
        "its key name; keys outside the ranges, on reserved addresses or not named after an\n"
        "address are not counted and are mentioned on stderr (see `check`).\n"
        "On a terminal each range gets a fill bar (yellow above 80%, red above 95%); piped,\n"
        "or with NO_COLOR set, a plain table.",
    )
    p.add_argument("pools", nargs="*", metavar="POOL", help="pool(s) to show (default: all)")
    p.add_argument(
        "--warn-at",
        type=_percent,
        metavar="PCT",
        help="exit 1 (and say which on stderr) when a pool is more than PCT%% used",
    )
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print JSON for scripts")
    fmt.add_argument(
        "--prometheus",
        action="store_true",
        help="print per-pool gauges in the Prometheus text format (node_exporter's textfile "
        "collector): ipam_da_consul_pool_allocated, _capacity, _free",
    )
    p.set_defaults(func=commands.usage)

    p = add(
        "who-has",
        "show which container holds an address",
        "Show the allocation of IP in every pool whose ranges contain it (or in --pool):\n"
        "target, interface, network, host and the runtime's own name for the container\n"
        "(a pod's namespace/name, a Nomad job/group). Exit 4 when nobody holds it.",
    )
    p.add_argument("ip", metavar="IP", help="the address")
    _finder_options(p, commands.who_has)

    p = add(
        "ip-of",
        "show the addresses a container holds",
        "Show the allocations of a container, named by its ID (or a unique prefix of 6+\n"
        "characters), its Nomad allocation ID, a pod's namespace/name, a Nomad job/group,\n"
        "or a Podman container's name (also as -/NAME). Exit 4 when it holds none.",
    )
    p.add_argument(
        "name", metavar="ID-OR-NAME", help="container ID, alloc ID, ns/pod, job/group, name"
    )
    _finder_options(p, commands.ip_of)

    p = add(
        "allocations",
        "list a pool's allocations with their targets",
        "List the allocations of POOL: address, target (container id), interface and host\n"
        "(the last two are recorded by this plugin; '-' when absent). Keys that are not valid\n"
        "allocations are counted on stderr (see `check`).",
    )
    p.add_argument("pool", metavar="POOL", help="pool name")
    p.add_argument(
        "--target",
        metavar="CID",
        help="only the allocations of this target (full ID or a unique prefix of 6+ characters)",
    )
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=commands.allocations)

    p = add(
        "release",
        "release one allocated address (compare-and-set)",
        "Release IP in POOL: delete its allocation key with a compare-and-set on the version\n"
        "just read, so a key re-allocated meanwhile is never deleted. An address a container\n"
        "holds needs --target (released only if the key still names that target: the\n"
        "container you know is gone) or --force (whatever holds it). Exits 4 and deletes\n"
        "nothing when the address is not allocated, is held by a container and neither is\n"
        "given, is held by another target, or changed during the release.",
    )
    p.add_argument("pool", metavar="POOL", help="pool name")
    p.add_argument("ip", metavar="IP", help="the address to release, e.g. 10.0.21.103")
    who = p.add_mutually_exclusive_group()
    who.add_argument(
        "--target",
        metavar="CID",
        help="release only if IP is held by this target (full ID or a unique prefix of 6+ "
        "characters among the pool's targets)",
    )
    who.add_argument(
        "--force",
        action="store_true",
        help="release an address a container holds without naming it (the output says so)",
    )
    p.set_defaults(func=commands.release)

    p = add(
        "check",
        "check pools for problems (exit 1 when any)",
        "Check POOL (default: every pool and orphaned folder under the prefix) and report:\n"
        "  missing-pool        allocations under a folder whose pool key is missing\n"
        "  invalid-ranges      the pool key does not hold IP ranges the plugin accepts\n"
        "  overlapping-ranges  two ranges share addresses\n"
        "  overlapping-pools   another pool hands out some of the same addresses\n"
        "  missing-folder      the folder key <prefix>POOL/ is missing\n"
        "  invalid-key         a key in the folder not named after an address (canonical form)\n"
        '  invalid-value       a value that is not an Allocation object {"target": ...}\n'
        "  outside-ranges      an allocation outside every range\n"
        "  reserved-address    an allocation on a network, broadcast or gateway address\n"
        "  duplicate-target    one target (and interface) holding several addresses\n"
        "  orphaned-allocation (with --live-ids) this host's allocation of a container not in\n"
        "                      the live list; `reconcile` releases these\n"
        "Exit status 1 when any problem is found, 0 when clean.",
    )
    p.add_argument("pools", nargs="*", metavar="POOL", help="pool(s) to check (default: all)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    _live_options(p, required=False)
    p.set_defaults(func=commands.check)

    p = add(
        "reconcile",
        "release this host's allocations of containers that no longer exist",
        "Release the allocations this host wrote (their `host` field) for containers not in\n"
        "the live list: the runtime's own list of its containers, one ID per line (full IDs\n"
        "or unique prefixes of 6+ characters; blank lines and # comments ignored). For\n"
        "runtimes that never call CNI GC, or lost a DEL while Consul was unreachable.\n"
        "\n"
        "A dry run unless --apply. Never touches allocations of other hosts, ones that record\n"
        "no host, or ones written after this run first read KV (their container may be newer\n"
        "than the list). Each release raises the attachment's fence first (a late write of it can\n"
        "never land), then deletes the key with a compare-and-set on the version read: a key\n"
        "re-allocated meanwhile is left alone. An empty list is refused (it would release\n"
        "everything of this host) unless --allow-empty.\n"
        "\n"
        "  podman ps -a -q --no-trunc | ipam-da-consul-admin reconcile --live-ids - --apply\n"
        "  { crictl pods -q --no-trunc; crictl ps -a -q --no-trunc; } |\n"
        "      ipam-da-consul-admin reconcile --live-ids - --apply\n"
        "  ipam-da-consul-admin reconcile --live-cmd 'podman ps -a -q --no-trunc' --apply\n"
        "\n"
        "--live-cmd reads KV first and lists afterwards, so no container can start between the\n"
        "two unseen; prefer it in timers. With --live-ids this run cannot tell when the list\n"
        "was taken: it judges only allocations an earlier run saw (recorded in this host's\n"
        "state folder) at least --settle seconds before; the first run judges none.\n"
        "\n"
        "--timeout bounds the reading of KV, and each release again; not the listing or\n"
        "--settle.\n"
        "\n"
        "Exit status 0 when done (or dry run), 4 when some release failed.",
    )
    _live_options(p, required=True)
    p.add_argument(
        "--pool",
        action="append",
        metavar="NAME",
        help="only this pool (repeatable; default: every pool under the prefix)",
    )
    p.add_argument(
        "--network",
        action="append",
        metavar="NAME",
        help="only allocations recording this CNI network name (repeatable)",
    )
    p.add_argument("--apply", action="store_true", help="release them (default: dry run)")
    p.add_argument(
        "--reuse-after",
        type=_seconds,
        default=0.0,
        metavar="SECONDS",
        help="release with this cool-down, as the plugin does (the networks' ipam.reuse_after)",
    )
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=rec.reconcile)

    p = add(
        "fences",
        "count the attachments' fences; hand those without a session to one",
        "Fences (<prefix>.fences/<network>/<container>/<ifname>) void late writes of deleted\n"
        "attachments. Each is tied to a Consul session that Consul ends an hour later at the\n"
        "earliest, deleting it. Older versions' fences, and those of a token that may not\n"
        "create sessions, have none and stay: --expire ties them to a session (this token\n"
        "needs session write), so Consul removes them an hour from now at the earliest.",
    )
    p.add_argument("--network", metavar="NAME", help="only this CNI network's fences")
    p.add_argument("--expire", action="store_true", help="hand fences without a session to one")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=housekeeping.fences)

    p = add(
        "journal",
        "show, redo or forget what this host's state folder still owes",
        "This host's state folder (IPAM_DA_CONSUL_STATE_DIR, default /var/lib/ipam-da-consul)\n"
        "keeps each attachment's writes, and what is left to do for some: a DEL the helper\n"
        "took over while Consul could not be reached, or writes a failed call left in doubt.\n"
        "The helper (or the host's next call) finishes them; after about a day of failures\n"
        "the helper gives up on one and says so.\n"
        "  list           entries with work left (network/container/ifname, what, keys)\n"
        "  retry [ENTRY]  do the work now, here (all pending entries by default)\n"
        "  drop ENTRY     forget an entry: its keys stay allocated (release them by hand)",
    )
    p.add_argument("action", choices=("list", "retry", "drop"))
    p.add_argument("entries", nargs="*", metavar="ENTRY", help="entry names (see `list`)")
    p.add_argument("--state-dir", metavar="DIR", help="the state folder (default: as above)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=housekeeping.journal)
    return parser


def _live_options(p: argparse.ArgumentParser, required: bool) -> None:
    what = "" if required else ": report this host's allocations of other containers"
    src = p.add_mutually_exclusive_group(required=required)
    src.add_argument(
        "--live-ids",
        metavar="FILE",
        help=f"the runtime's live container IDs, one per line ('-' for stdin){what}",
    )
    src.add_argument(
        "--live-cmd",
        metavar="COMMAND",
        help="run this shell command to list them, after reading KV (for timers: exact, and "
        "its failure stops the run), e.g. 'podman ps -a -q --no-trunc'",
    )
    p.add_argument(
        "--settle",
        type=_seconds,
        default=5.0,
        metavar="SECONDS",
        help="with --live-cmd: wait this long between reading KV and listing, so containers "
        "whose network was being set up are listed; with --live-ids: judge only what an "
        "earlier run saw at least this long ago (default: 5)",
    )
    p.add_argument(
        "--state-dir",
        metavar="DIR",
        help="this host's state folder, where --live-ids runs record what they saw (default: "
        "IPAM_DA_CONSUL_STATE_DIR, else /var/lib/ipam-da-consul)",
    )
    p.add_argument(
        "--host",
        metavar="HOST",
        help="the host identity the plugin records (its ipam.host; default: this host's, "
        "<hostname>#<tag>)",
    )
    p.add_argument(
        "--allow-empty",
        action="store_true",
        help="accept an empty live list (this host really runs no container)",
    )


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value <= 600:
        raise argparse.ArgumentTypeError("give 0 to 600 seconds")
    return value


def fail(message: str, status: int) -> int:
    sys.stderr.write(f"{PROG}: error: {message}\n")
    return status


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "token", None):
        # Not refused: scripts use it. Every local user can read a process's arguments.
        sys.stderr.write(
            f"{PROG}: warning: --token puts the ACL token in the process list, where every "
            "local user can read it; use --token-file FILE, --token-file - (stdin), "
            "CONSUL_HTTP_TOKEN_FILE or CONSUL_HTTP_TOKEN\n"
        )
    logger.remove()
    if getattr(args, "verbose", False):
        # Requests are logged by path and status; the token travels in a header and is never
        # logged.
        logger.add(sys.stderr, level="DEBUG", format="{time:HH:mm:ss.SSS} {level} {message}")
    func: Callable[[commands.Context, argparse.Namespace], int] = args.func
    ctx: commands.Context | None = None
    try:
        ctx = commands.Context(resolve(args), Progress())
        return func(ctx, args)
    except AdminError as exc:
        return fail(exc.message, exc.status)
    except ConsulUnavailable as exc:
        return fail(
            f"{exc}. Check --consul / CONSUL_HTTP_ADDR, that the agent runs, and --timeout",
            CONSUL,
        )
    except NotConsul as exc:
        return fail(f"{exc}. Check --consul / CONSUL_HTTP_ADDR", CONSUL)
    except UnsafeKey as exc:
        return fail(str(exc), STATE)  # a key in KV, not Consul, is what is wrong
    except ConsulError as exc:
        hint = ""
        if exc.status in (401, 403):
            hint = "; give a token with KV access on the prefix: --token-file, CONSUL_HTTP_TOKEN"
        return fail(f"{exc}{hint}", CONSUL)
    finally:
        if ctx is not None:
            ctx.progress.clear()
            ctx.close()


def main() -> None:
    harden()  # the CLI holds an ACL token
    try:
        status = run()
        sys.stdout.flush()
    except KeyboardInterrupt:
        sys.stderr.write(f"\n{PROG}: interrupted\n")
        status = 130
    except BrokenPipeError:
        # Output piped into `head` and the like: not an error worth a traceback. Point stdout
        # at /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        status = 0
    raise SystemExit(status)


if __name__ == "__main__":
    main()
