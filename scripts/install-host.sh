#!/usr/bin/env bash
# `make install`: installs nodemesh as a systemd service on a host without Kubernetes.
#   /opt/nodemesh/venv                       the project, installed (not editable) into a venv
#                                            that sees Debian's bcc (--system-site-packages)
#   /usr/local/bin/nodemesh                  a wrapper that runs it from that venv
#   /usr/share/nodemesh/bpf/                 the BPF sources the agent compiles at start
#   /etc/systemd/system/nodemesh.service     the hardened unit (replaced on every install)
#   /etc/nodemesh/nodemesh.env               its environment      } kept if they exist:
#   /etc/nodemesh/config.yaml                an empty config      } they are the admin's
#   /etc/nodemesh/config.example.yaml        a sample config (replaced on every install)
# It then prints how to start the service; it enables nothing itself.
#
# Settings (environment):
#   DESTDIR=/some/dir   stage every file under that folder instead of / (tests, packaging).
#                       A venv is not relocatable: one staged here works only at its final
#                       path, so packagers set NODEMESH_VENV instead.
#   NODEMESH_VENV=PATH  use that existing venv as is (it must have bin/nodemesh, e.g. the
#                       project's .venv from `make setup`) instead of installing into
#                       /opt/nodemesh/venv. Note that the unit's ProtectHome=yes hides
#                       /root and /home, so such a venv must live elsewhere.
# Needs Debian's python3-bpfcc and python3-venv (`make setup` installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DESTDIR=${DESTDIR:-}
DESTDIR=${DESTDIR%/}
log() { printf '[install] %s\n' "$*"; }
die() { printf 'install-host.sh: %s\n' "$*" >&2; exit 1; }

if [[ -z $DESTDIR && $(id -u) -ne 0 ]]; then
  die "must run as root to install into / (or set DESTDIR to stage the files)"
fi

# install_new SRC DEST MODE: copy unless DEST exists (configuration belongs to the admin).
install_new() {
  if [[ -e $2 ]]; then
    log "kept existing ${2#"$DESTDIR"}"
  else
    install -D -m "$3" "$1" "$2"
    log "installed ${2#"$DESTDIR"}"
  fi
}

if [[ -n ${NODEMESH_VENV:-} ]]; then
  venv=${NODEMESH_VENV%/}
  [[ -x $venv/bin/nodemesh ]] || die "NODEMESH_VENV=$venv has no bin/nodemesh"
  log "using the existing venv $venv"
else
  venv=/opt/nodemesh/venv
  if [[ ! -x $DESTDIR$venv/bin/python ]]; then
    log "creating $venv"
    mkdir -p "$(dirname "$DESTDIR$venv")"
    /usr/bin/python3 -m venv --system-site-packages "$DESTDIR$venv"
  fi
  log "installing nodemesh from $ROOT into $venv"
  # pip always rebuilds and reinstalls a project given as a folder, so running this
  # again after `git pull` replaces the code even when the version did not change.
  "$DESTDIR$venv/bin/python" -m pip install -q --upgrade "$ROOT"
fi

# The wrapper, not a symlink: the venv's console script finds its interpreter by path.
wrapper=$DESTDIR/usr/local/bin/nodemesh
install -d "$(dirname "$wrapper")"
cat > "$wrapper.tmp" <<EOF
#!/bin/sh
# Installed by nodemesh's scripts/install-host.sh: runs the agent from its venv.
exec $venv/bin/nodemesh "\$@"
EOF
chmod 755 "$wrapper.tmp"
mv -f "$wrapper.tmp" "$wrapper"
log "installed /usr/local/bin/nodemesh -> $venv/bin/nodemesh"

# The loader's last fallback (after NODEMESH_BPF_DIR and a source checkout's bpf/).
bpfdir=$DESTDIR/usr/share/nodemesh/bpf
rm -rf "$bpfdir"
install -d "$bpfdir"
if compgen -G "$ROOT/bpf/*" >/dev/null; then
  cp -R "$ROOT"/bpf/. "$bpfdir"/
fi
log "installed /usr/share/nodemesh/bpf"

install -D -m 644 deploy/systemd/nodemesh.service "$DESTDIR/etc/systemd/system/nodemesh.service"
log "installed /etc/systemd/system/nodemesh.service"
install -d -m 755 "$DESTDIR/etc/nodemesh"
install_new deploy/systemd/nodemesh.env "$DESTDIR/etc/nodemesh/nodemesh.env" 644
install -m 644 deploy/examples/config.yaml "$DESTDIR/etc/nodemesh/config.example.yaml"
if [[ -e $DESTDIR/etc/nodemesh/config.yaml ]]; then
  log "kept existing /etc/nodemesh/config.yaml"
else
  # Empty on purpose: a fresh install must not take over any address before the admin
  # says which services to balance.
  cat > "$DESTDIR/etc/nodemesh/config.yaml" <<'EOF'
# nodemesh services on this host; see config.example.yaml beside this file.
# The agent reloads when this file changes. Check it with:
#   nodemesh check --config /etc/nodemesh/config.yaml
services: []
EOF
  chmod 644 "$DESTDIR/etc/nodemesh/config.yaml"
  log "installed /etc/nodemesh/config.yaml (no services yet)"
fi

# sd_booted(): systemd is the init system only where /run/systemd/system exists. Never
# call systemctl otherwise (containers, CI), nor for a staged install.
if [[ -z $DESTDIR && -d /run/systemd/system ]]; then
  systemctl daemon-reload
  log "systemd reloaded its units"
fi
cat <<EOF

Next steps:
  edit /etc/nodemesh/config.yaml (see config.example.yaml) and /etc/nodemesh/nodemesh.env
  nodemesh preflight        # does this kernel offer what nodemesh needs?
  systemctl daemon-reload && systemctl enable --now nodemesh
EOF
