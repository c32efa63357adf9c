"""Kubernetes' own control plane, built from source and run in the current network namespace.

``python -m testbed.controlplane build | up | down`` (wrapped by ``scripts/controlplane``):

* ``build`` compiles kube-apiserver, kube-controller-manager, kube-scheduler and kubectl from
  ``k8s.io/kubernetes`` and etcd from ``go.etcd.io/etcd/server/v3``, at the releases pinned by the
  wrapper modules in ``testbed/go/`` (go.mod + go.sum). The binaries go to a cache outside the
  repository, keyed by those pins, the Go version and the flags; a second ``build`` with the same
  pins does nothing and needs no network.
* ``up`` needs no network. It generates certificates, a service-account signing key and
  kubeconfigs, starts etcd, the API server, the controller manager and the scheduler, waits until
  each is healthy, prints the admin kubeconfig's path as its last line and stays in the foreground.
  SIGTERM/SIGINT (or ``down``) stops everything it started; SIGHUP restarts the API server (tests
  use it: "the API server restarted under traffic"). If a component dies, everything stops, exit 1.

The API server will not advertise a loopback address, so ``up`` gives it one of its own on ``lo``
(192.0.2.1 from the documentation range by default) and serves only there: run it in a network
namespace of your own (``ip netns exec NS scripts/controlplane up``) and route that address to it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import ipaddress
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from testbed import pki

GO_DIR = Path(__file__).resolve().parent / "go"
KUBE_MODULE = GO_DIR / "kube"
ETCD_MODULE = GO_DIR / "etcd"
KUBE_COMMANDS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")
BINARIES = (*KUBE_COMMANDS, "etcd")
CACHE_ENV = "SVCPROXY_CONTROLPLANE_CACHE"
"""Overrides where built binaries are kept (default ``$XDG_CACHE_HOME/svcproxy/controlplane``)."""


class ControlPlaneError(Exception):
    """The control plane cannot be built or started; the message says why."""


# -- build --------------------------------------------------------------------------------------


def pinned_version(module: Path, path: str) -> str:
    """The version ``module``'s go.mod requires of ``path`` (the single place each pin lives)."""
    match = re.search(rf"^\s*(?:require\s+)?{re.escape(path)}\s+(v\S+)", (module / "go.mod").read_text(), re.M)
    if match is None:
        raise ControlPlaneError(f"{module}/go.mod does not require {path}")
    return match.group(1)


def kubernetes_version() -> str:
    return pinned_version(KUBE_MODULE, "k8s.io/kubernetes")


def etcd_version() -> str:
    return pinned_version(ETCD_MODULE, "go.etcd.io/etcd/server/v3")


def _kube_ldflags(version: str) -> str:
    # What hack/lib/version.sh stamps into a release build, so --version tells the truth.
    major, minor = version.lstrip("v").split(".")[:2]
    return " ".join(["-s", "-w",
                     *(f"-X {pkg}.gitVersion={version}" for pkg in ("k8s.io/component-base/version",
                                                                    "k8s.io/client-go/pkg/version")),
                     *(f"-X {pkg}.gitMajor={major} -X {pkg}.gitMinor={minor}"
                       for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version")),
                     "-X k8s.io/component-base/version.gitTreeState=clean"])


def cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "svcproxy" / "controlplane"


def _go() -> str:
    go = shutil.which("go")
    if go is None:
        raise ControlPlaneError("Go is not installed (https://go.dev/doc/install); the cluster tier needs it")
    return go


def build_key(go: str) -> str:
    """Everything that decides the binaries: the pins, the flags, the Go toolchain and platform."""
    h = hashlib.sha256()
    for module in (KUBE_MODULE, ETCD_MODULE):
        h.update((module / "go.mod").read_bytes())
        h.update((module / "go.sum").read_bytes())
    h.update(_kube_ldflags(kubernetes_version()).encode())
    env = subprocess.run([go, "env", "GOVERSION", "GOOS", "GOARCH"], capture_output=True, text=True, check=True)
    h.update(env.stdout.encode())
    return f"{kubernetes_version()}-etcd{etcd_version()}-{h.hexdigest()[:12]}"


def built_binaries() -> Path | None:
    """The folder with every pinned binary, if it has been built; None otherwise (or without Go)."""
    try:
        folder = cache_root() / build_key(_go()) / "bin"
    except (ControlPlaneError, subprocess.CalledProcessError):
        return None
    return folder if all((folder / b).is_file() for b in BINARIES) else None


def build(*, log: Any = sys.stderr) -> Path:
    """Build the pinned binaries unless they are already built; return their folder."""
    go = _go()
    dest = cache_root() / build_key(go)
    if all((dest / "bin" / b).is_file() for b in BINARIES):
        print(f"control plane {kubernetes_version()} (etcd {etcd_version()}) already built in {dest}/bin",
              file=log)
        return dest / "bin"
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    started = time.monotonic()
    print(f"building Kubernetes {kubernetes_version()} and etcd {etcd_version()} from source into {dest} "
          "(first time: several minutes)", file=log, flush=True)
    env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-mod=readonly -buildvcs=false"}
    try:
        subprocess.run([go, "build", "-trimpath", "-ldflags", _kube_ldflags(kubernetes_version()),
                        "-o", f"{tmp}/bin/", *(f"k8s.io/kubernetes/cmd/{c}" for c in KUBE_COMMANDS)],
                       cwd=KUBE_MODULE, env=env, check=True)
        subprocess.run([go, "build", "-trimpath", "-ldflags", "-s -w", "-o", f"{tmp}/bin/etcd",
                        "go.etcd.io/etcd/server/v3"], cwd=ETCD_MODULE, env=env, check=True)
    except subprocess.CalledProcessError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ControlPlaneError(f"go build failed ({e.returncode}); see the output above") from e
    if dest.exists():  # a concurrent build finished first: keep its result
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(dest)
    print(f"built in {time.monotonic() - started:.0f}s: {dest}/bin", file=log)
    return dest / "bin"


# -- up -----------------------------------------------------------------------------------------


@dataclass
class Options:
    state_dir: Path
    advertise_address: str = "192.0.2.1"
    service_cidr: str = "10.96.0.0/16"
    extra_sans: list[str] = field(default_factory=list)
    apiserver_port: int = 6443
    etcd_port: int = 2379
    verbosity: int = 1


def default_state_dir() -> Path:
    """One per network namespace, so ``down`` run in the same namespace finds what ``up`` started."""
    return Path(tempfile.gettempdir()) / f"svcproxy-controlplane-{os.stat('/proc/self/ns/net').st_ino}"


def _kubeconfig(path: Path, server: str, ca: Path, cert: Path, key: Path, user: str) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "testbed",
        "clusters": [{"name": "testbed", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": {"client-certificate": str(cert), "client-key": str(key)}}],
        "contexts": [{"name": "testbed", "context": {"cluster": "testbed", "user": user}}],
    }))
    path.chmod(0o600)
    return path


def _is_local(address: str) -> bool:
    out = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True, check=True).stdout
    return any(line.split()[3].split("/")[0] == address for line in out.splitlines() if len(line.split()) > 3)


class ControlPlane:
    """etcd, kube-apiserver, kube-controller-manager and kube-scheduler as child processes."""

    def __init__(self, binaries: Path, options: Options) -> None:
        self.bin = binaries
        self.o = options
        self.dir = options.state_dir
        self.pki = self.dir / "pki"
        self.logs = self.dir / "logs"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.added_address = False
        self.server = f"https://{self._host(options.advertise_address)}:{options.apiserver_port}"

    @staticmethod
    def _host(ip: str) -> str:
        return f"[{ip}]" if ":" in ip else ip

    @property
    def admin_kubeconfig(self) -> Path:
        return self.dir / "admin.kubeconfig"

    # set-up

    def prepare(self) -> None:
        if self.dir.exists():
            shutil.rmtree(self.dir)
        for d in (self.pki, self.logs, self.dir / "etcd"):
            d.mkdir(parents=True, mode=0o700)
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        if not _is_local(self.o.advertise_address):
            bits = 128 if ":" in self.o.advertise_address else 32
            subprocess.run(["ip", "addr", "add", f"{self.o.advertise_address}/{bits}", "dev", "lo"], check=True)
            self.added_address = True
        ca = pki.Authority(self.pki)
        service_ip = str(next(ipaddress.ip_network(self.o.service_cidr).hosts()))
        ca.issue("apiserver", "kube-apiserver", server=True,
                 dns=["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                      "kubernetes.default.svc.cluster.local"],
                 ips=[self.o.advertise_address, service_ip, "127.0.0.1", *self.o.extra_sans])
        pki.service_account_keys(self.pki)
        for stem, cn, orgs in (("admin", "kubernetes-admin", ["system:masters"]),
                               ("controller-manager", "system:kube-controller-manager", []),
                               ("scheduler", "system:kube-scheduler", [])):
            crt, key = ca.issue(stem, cn, orgs=orgs)
            name = self.admin_kubeconfig if stem == "admin" else self.dir / f"{stem}.kubeconfig"
            _kubeconfig(name, self.server, ca.cert_path, crt, key, cn)

    # processes

    def _spawn(self, name: str, argv: list[str]) -> None:
        with open(self.logs / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, start_new_session=True)

    def _etcd_argv(self) -> list[str]:
        client = f"http://127.0.0.1:{self.o.etcd_port}"
        peer = f"http://127.0.0.1:{self.o.etcd_port + 1}"
        return [str(self.bin / "etcd"), "--name", "testbed", "--data-dir", str(self.dir / "etcd"),
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"testbed={peer}", "--log-level", "warn",
                # a throwaway store: durability buys nothing, and fsync makes a 10k-object test crawl
                "--unsafe-no-fsync"]

    def _apiserver_argv(self) -> list[str]:
        p = self.pki
        return [str(self.bin / "kube-apiserver"),
                f"--advertise-address={self.o.advertise_address}", f"--bind-address={self.o.advertise_address}",
                f"--secure-port={self.o.apiserver_port}",
                f"--etcd-servers=http://127.0.0.1:{self.o.etcd_port}",
                f"--service-cluster-ip-range={self.o.service_cidr}",
                f"--client-ca-file={p / 'ca.crt'}",
                f"--tls-cert-file={p / 'apiserver.crt'}", f"--tls-private-key-file={p / 'apiserver.key'}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={p / 'sa.pub'}",
                f"--service-account-signing-key-file={p / 'sa.key'}",
                "--authorization-mode=Node,RBAC", "--allow-privileged=true", "--profiling=false",
                # no aggregated API servers here; set so the components' authn config is complete
                f"--requestheader-client-ca-file={p / 'ca.crt'}", "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User", "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                f"-v={self.o.verbosity}"]

    def _controller_manager_argv(self) -> list[str]:
        kc = self.dir / "controller-manager.kubeconfig"
        return [str(self.bin / "kube-controller-manager"),
                f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}", f"--authorization-kubeconfig={kc}",
                f"--service-account-private-key-file={self.pki / 'sa.key'}",
                f"--root-ca-file={self.pki / 'ca.crt'}", "--use-service-account-credentials=true",
                f"--service-cluster-ip-range={self.o.service_cidr}",
                "--leader-elect=false", "--bind-address=127.0.0.1", "--secure-port=10257",
                f"-v={self.o.verbosity}"]

    def _scheduler_argv(self) -> list[str]:
        kc = self.dir / "scheduler.kubeconfig"
        return [str(self.bin / "kube-scheduler"), f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}",
                f"--authorization-kubeconfig={kc}", "--leader-elect=false", "--bind-address=127.0.0.1",
                "--secure-port=10259", f"-v={self.o.verbosity}"]

    def _admin_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        ctx.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
        return ctx

    def _wait(self, name: str, url: str, ctx: ssl.SSLContext | None, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            proc = self.procs[name]
            if proc.poll() is not None:
                raise ControlPlaneError(f"{name} exited with {proc.returncode}; see {self.logs / name}.log")
            try:
                with urllib.request.urlopen(url, context=ctx, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError) as e:
                last = str(e)
            time.sleep(0.2)
        raise ControlPlaneError(f"{name} not healthy within {timeout:.0f}s ({url}: {last})")

    def start_etcd(self) -> None:
        self._spawn("etcd", self._etcd_argv())
        self._wait("etcd", f"http://127.0.0.1:{self.o.etcd_port}/health", None)

    def start_apiserver(self) -> None:
        self._spawn("kube-apiserver", self._apiserver_argv())
        self._wait("kube-apiserver", f"{self.server}/readyz", self._admin_context())

    def start(self) -> None:
        self.prepare()
        self.start_etcd()
        self.start_apiserver()
        insecure = ssl._create_unverified_context()  # their self-signed serving certs; /healthz only
        self._spawn("kube-controller-manager", self._controller_manager_argv())
        self._spawn("kube-scheduler", self._scheduler_argv())
        self._wait("kube-controller-manager", "https://127.0.0.1:10257/healthz", insecure)
        self._wait("kube-scheduler", "https://127.0.0.1:10259/healthz", insecure)

    def _stop(self, name: str, grace: float = 10.0) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def restart_apiserver(self) -> float:
        started = time.monotonic()
        # It lingers on open watches after SIGTERM; 5 s is plenty for everything else to finish.
        self._stop("kube-apiserver", grace=5)
        self.start_apiserver()
        return time.monotonic() - started

    def stop(self) -> None:
        for name in ("kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"):
            self._stop(name)
        if self.added_address:
            bits = 128 if ":" in self.o.advertise_address else 32
            subprocess.run(["ip", "addr", "del", f"{self.o.advertise_address}/{bits}", "dev", "lo"],
                           capture_output=True)
            self.added_address = False

    def died(self) -> str | None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                return f"{name} exited with {proc.returncode}; see {self.logs / name}.log"
        return None


@contextlib.contextmanager
def _signals(handler: Any, *signums: int) -> Iterator[None]:
    old = {s: signal.signal(s, handler) for s in signums}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class _Stop(Exception):
    pass


def up(options: Options) -> int:
    binaries = built_binaries()
    if binaries is None:
        raise ControlPlaneError("the control plane is not built: run `scripts/controlplane build` first")
    pidfile = options.state_dir.with_suffix(".pid")
    if pidfile.exists():
        with contextlib.suppress(ValueError, ProcessLookupError):
            os.kill(int(pidfile.read_text()), 0)
            raise ControlPlaneError(f"already up (pid {pidfile.read_text().strip()}); `down` stops it")
    cp = ControlPlane(binaries, options)
    restart = False

    def on_signal(signum: int, _frame: Any) -> None:
        nonlocal restart
        if signum == signal.SIGHUP:
            restart = True
        else:
            raise _Stop

    try:
        with _signals(on_signal, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            pidfile.write_text(str(os.getpid()))
            started = time.monotonic()
            cp.start()
            print(f"control plane {kubernetes_version()} up in {time.monotonic() - started:.1f}s: "
                  f"API server {cp.server}, logs in {cp.logs}", file=sys.stderr, flush=True)
            print(cp.admin_kubeconfig, flush=True)
            while True:
                time.sleep(0.2)
                if restart:
                    restart = False
                    took = cp.restart_apiserver()
                    print(f"kube-apiserver restarted ({took:.1f}s)", file=sys.stderr, flush=True)
                dead = cp.died()
                if dead:
                    print(f"control plane: {dead}; stopping", file=sys.stderr, flush=True)
                    return 1
    except _Stop:
        return 0
    finally:
        with _signals(signal.SIG_IGN, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            cp.stop()
            pidfile.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    """Alive and not a zombie (an exited `up` whose parent has not reaped it yet is done)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def down(state_dir: Path, timeout: float = 30.0) -> int:
    pidfile = state_dir.with_suffix(".pid")
    try:
        pid = int(pidfile.read_text())
        os.kill(pid, signal.SIGTERM)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        print("control plane: not up", file=sys.stderr)
        return 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _running(pid):
            return 0
        time.sleep(0.1)
    print(f"control plane (pid {pid}) still running after {timeout:.0f}s", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/controlplane", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="build the pinned binaries (needs the Go module proxy the first time)")
    sub.add_parser("version", help="print the pinned versions and whether they are built")
    for name in ("up", "down"):
        p = sub.add_parser(name, help="start in the foreground" if name == "up" else "stop what `up` started")
        p.add_argument("--dir", type=Path, default=None,
                       help="state folder (default: one per network namespace under the temp dir)")
        if name == "up":
            p.add_argument("--advertise-address", default="192.0.2.1")
            p.add_argument("--service-cidr", default="10.96.0.0/16")
            p.add_argument("--extra-san", action="append", default=[], help="another IP for the serving cert")
            p.add_argument("-v", type=int, default=1, dest="verbosity", help="the components' log verbosity")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            build()
            return 0
        if args.command == "version":
            print(json.dumps({"kubernetes": kubernetes_version(), "etcd": etcd_version(),
                              "binaries": str(built_binaries() or "")}))
            return 0
        state = args.dir or default_state_dir()
        if args.command == "down":
            return down(state)
        return up(Options(state_dir=state, advertise_address=args.advertise_address,
                          service_cidr=args.service_cidr, extra_sans=args.extra_san,
                          verbosity=args.verbosity))
    except ControlPlaneError as e:
        print(f"controlplane: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
