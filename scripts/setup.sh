# Sourced by scripts/demo and scripts/test: a virtualenv in .venv with svcproxy installed.
# Usage: . scripts/setup.sh [pip extras] ; with "--system-packages" as root it also installs the
# Debian packages the tests use (iproute2 for network namespaces, nftables for the VIP guard,
# wrk and nginx for the benchmark smoke test, nginx and haproxy as PROXY protocol consumers, dnsmasq
# and dig for the DNS test).
set -euo pipefail

need_apt=()
if [ "${SVCPROXY_SYSTEM_PACKAGES:-0}" = 1 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  command -v ip >/dev/null || need_apt+=(iproute2)
  command -v wrk >/dev/null || need_apt+=(wrk)
  command -v nginx >/dev/null || need_apt+=(nginx-light)
  command -v haproxy >/dev/null || need_apt+=(haproxy)
  command -v nft >/dev/null || need_apt+=(nftables)
  command -v dnsmasq >/dev/null || need_apt+=(dnsmasq-base)
  command -v dig >/dev/null || need_apt+=(bind9-dnsutils)
fi
if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then need_apt+=(python3-venv); fi
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Debian packages: ${need_apt[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    # RUNLEVEL=1: do not start the distribution's nginx service (it would take port 80).
    RUNLEVEL=1 DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  else
    echo "note: missing Debian packages (${need_apt[*]}); tests that need them will be skipped" >&2
  fi
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
extras="${1:-}"
stamp=".venv/.installed${extras:+-$extras}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  # Quiet unless it fails: then the whole pip log.
  echo "setting up .venv (pip install${extras:+ with $extras})..."
  if ! { .venv/bin/python -m pip install -q --upgrade pip &&
         .venv/bin/python -m pip install -q -e ".${extras:+[$extras]}"; } >.venv/setup.log 2>&1; then
    cat .venv/setup.log >&2
    echo "setup failed; the log above is also in .venv/setup.log" >&2
    exit 1
  fi
  touch "$stamp"
fi
export PATH="$PWD/.venv/bin:$PATH"
