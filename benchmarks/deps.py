"""Install the tools the harness drives, only when they are missing."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

# binary -> Debian package that ships it
BINARIES: dict[str, str] = {
    "wrk": "wrk",
    "haproxy": "haproxy",
    "nginx": "nginx",
    "nft": "nftables",
    "ip": "iproute2",
}
# The stream module is a separate package on Debian; without it nginx rejects `stream {}`.
NGINX_STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"


def missing_binaries(names: list[str]) -> list[str]:
    return [n for n in names if shutil.which(n) is None]


def apt_packages_for(binaries: list[str], need_stream: bool) -> list[str]:
    pkgs = [BINARIES[b] for b in missing_binaries(binaries)]
    if need_stream and not os.path.exists(NGINX_STREAM_MODULE):
        pkgs.append("libnginx-mod-stream")
    return sorted(set(pkgs))


def apt_install(packages: list[str]) -> None:
    if not packages:
        return
    # RUNLEVEL=1 keeps invoke-rc.d from starting the distro's nginx/haproxy services
    # in the host namespace when there is no policy-rc.d in place.
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", RUNLEVEL="1")
    print(f"[deps] apt-get install {' '.join(packages)}", flush=True)
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )


def have_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def ensure_matplotlib(install: bool) -> bool:
    if have_matplotlib():
        return True
    if not install:
        return False
    print("[deps] pip install matplotlib", flush=True)
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "matplotlib"])
    importlib.invalidate_caches()
    return done.returncode == 0 and have_matplotlib()


def ensure(binaries: list[str], need_stream: bool, install: bool) -> list[str]:
    """Install what is missing (if allowed); return what is still missing."""
    pkgs = apt_packages_for(binaries, need_stream)
    if pkgs and install:
        apt_install(pkgs)
    still = missing_binaries(binaries)
    if need_stream and not os.path.exists(NGINX_STREAM_MODULE):
        still.append("libnginx-mod-stream")
    return still
