# Sourced by scripts/test: Debian packages the tests use (the sqlite3 shell as
# an outside writer, openssl s_client, iproute2 for network-namespace hosts,
# avahi for the avahi-browse check, systemd-analyze for the unit). Installed
# only when missing, only as root with apt-get; otherwise the tests that need
# them skip and say why.
SYSTEM_PACKAGES="sqlite3 openssl iproute2 avahi-daemon avahi-utils dbus iputils-ping systemd"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && [ -z "${P2PSTORE_NO_APT:-}" ]; then
    missing=""
    for pkg in $SYSTEM_PACKAGES; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing="$missing $pkg"
    done
    if [ -n "$missing" ]; then
        echo "installing system packages:$missing" >&2
        # Never let a package start its service on the host (avahi on eth0, ...).
        if [ ! -e /usr/sbin/policy-rc.d ]; then
            printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
        fi
        apt-get update -qq >&2 || true
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >&2 || \
            echo "warning: could not install:$missing (tests needing them will skip)" >&2
    fi
fi
