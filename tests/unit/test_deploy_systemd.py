"""deploy/systemd and scripts/install-host.sh (`make install`): the unit passes
`systemd-analyze verify` as it is, is hardened without taking away what BPF and BCC need,
and the installer stages the unit, its environment, a config and the command."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "systemd" / "nodemesh.service"
ENV_FILE = ROOT / "deploy" / "systemd" / "nodemesh.env"
INSTALL = ROOT / "scripts" / "install-host.sh"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (Debian package systemd)")

# What the agent was measured to need (tests/e2e/test_security_defaults.py runs it with this
# set and no more): no PERFMON nor IPC_LOCK, since there are no perf buffers.
DATAPATH_CAPABILITIES = {"CAP_BPF", "CAP_NET_ADMIN", "CAP_SYS_ADMIN", "CAP_SYS_RESOURCE"}


def unit_settings(text=None):
    """{section: {key: [values]}}: systemd allows a key more than once."""
    sections, current = {}, None
    for raw in (text if text is not None else UNIT.read_text()).splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def service(key):
    values = unit_settings()["Service"].get(key, [])
    return values[-1] if values else None


def words(key):
    return {w for v in unit_settings()["Service"].get(key, []) for w in v.split()}


def verify(unit_text, tmp_path):
    """systemd-analyze verify on a unit installed, unchanged, in a root of its own.

    --root makes systemd resolve the unit's dependencies and commands inside that root: it
    gets the host's stock units and an executable stub at each absolute command path."""
    root = tmp_path / "root"
    for candidate in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")):
        if candidate.is_dir():
            shutil.copytree(candidate, root / "usr/lib/systemd/system", symlinks=True)
            break
    for key in ("ExecStart", "ExecReload", "ExecStartPre", "ExecStop", "ExecStopPost"):
        for command in unit_settings(unit_text)["Service"].get(key, []):
            path = Path(command.lstrip("-@:+!").split()[0])
            if path.is_absolute():
                stub = root / path.relative_to("/")
                stub.parent.mkdir(parents=True, exist_ok=True)
                stub.write_text("#!/bin/sh\n")
                stub.chmod(0o755)
    target = root / "etc/systemd/system/nodemesh.service"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(unit_text)
    return subprocess.run([SYSTEMD_ANALYZE, "verify", f"--root={root}", "nodemesh.service"],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "SYSTEMD_LOG_COLOR": "0"})


@needs_systemd_analyze
def test_unit_passes_systemd_analyze_verify_without_a_warning(tmp_path):
    result = verify(UNIT.read_text(), tmp_path)
    # verify exits 0 for lines it ignores ("Unknown key", "Failed to parse"): any output
    # is a setting systemd would not apply.
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stdout + result.stderr


@needs_systemd_analyze
def test_verify_catches_a_setting_systemd_would_ignore(tmp_path):
    broken = UNIT.read_text().replace("ProtectSystem=strict", "ProtectSystem=strictest")
    result = verify(broken, tmp_path)
    assert "protect system value" in (result.stdout + result.stderr).lower()


def test_unit_runs_the_agent_with_the_etc_config_and_its_environment_file():
    assert service("ExecStart") == "/usr/local/bin/nodemesh run --config /etc/nodemesh/config.yaml"
    # "-": a missing file is no error.
    assert service("EnvironmentFile") == "-/etc/nodemesh/nodemesh.env"
    assert unit_settings()["Install"]["WantedBy"] == ["multi-user.target"]


def test_reload_sends_sighup_stop_sends_sigterm_and_failures_restart():
    assert service("ExecReload") == "/bin/kill -HUP $MAINPID"
    # SIGTERM: the agent exits and leaves the datapath in the kernel.
    assert service("KillSignal") == "SIGTERM"
    assert service("Restart") == "on-failure"
    assert not [k for k in unit_settings()["Service"] if k.startswith("ExecStop")], \
        "stopping the service must not remove the datapath"


def test_capabilities_are_exactly_the_datapaths():
    assert words("CapabilityBoundingSet") == DATAPATH_CAPABILITIES
    assert words("AmbientCapabilities") == DATAPATH_CAPABILITIES


def test_capabilities_match_the_kubernetes_agents():
    yaml = pytest.importorskip("yaml")
    daemonset = yaml.safe_load((ROOT / "deploy/kubernetes/daemonset.yaml").read_text())
    (agent,) = [c for c in daemonset["spec"]["template"]["spec"]["containers"] if c["name"] == "agent"]
    assert {f"CAP_{c}" for c in agent["securityContext"]["capabilities"]["add"]} == words("CapabilityBoundingSet")


@needs_systemd_analyze
def test_every_capability_name_is_one_systemd_knows():
    # systemd drops an unknown capability name without a word, even in verify.
    table = subprocess.run([SYSTEMD_ANALYZE, "capability"], capture_output=True, text=True,
                           check=True).stdout
    known = {line.split()[0].upper() for line in table.splitlines()[1:] if line.strip()}
    assert words("CapabilityBoundingSet") <= known
    assert words("AmbientCapabilities") <= known


def test_filesystem_is_read_only_except_pins_and_admin_socket():
    assert service("ProtectSystem") == "strict"
    assert service("ProtectHome") == "yes"
    assert service("NoNewPrivileges") == "yes"
    assert words("ReadWritePaths") == {"/sys/fs/bpf", "/run/nodemesh"}
    assert service("RuntimeDirectory") == "nodemesh"
    # Kernels < 5.11 charge BPF maps to the locked-memory limit.
    assert service("LimitMEMLOCK") == "infinity"


def test_descriptor_limit_is_well_above_systemds_default_of_1024():
    # At 1,024, a thousand idle metrics clients once left the agent unable to reload.
    assert int(service("LimitNOFILE")) >= 65536


def test_hardening_leaves_what_bcc_and_the_datapath_need():
    settings = unit_settings()["Service"]
    # Hides /lib/modules, where BCC finds the kernel headers.
    assert settings.get("ProtectKernelModules", ["no"])[-1] != "yes"
    # BCC's LLVM maps its output executable.
    assert settings.get("MemoryDenyWriteExecute", ["no"])[-1] != "yes"
    assert settings.get("PrivateNetwork", ["no"])[-1] != "yes"
    assert settings.get("ProcSubset", ["all"])[-1] == "all"  # /proc/kallsyms, /proc/sys
    assert {"AF_NETLINK", "AF_UNIX", "AF_INET", "AF_INET6"} <= words("RestrictAddressFamilies")


@needs_systemd_analyze
def test_system_call_filter_denies_none_of_the_calls_bpf_needs():
    filters = unit_settings()["Service"].get("SystemCallFilter", [])
    assert all(f.startswith("~") for f in filters), "an allow-list would have to name bpf and more"
    denied = set()
    for name in {w.lstrip("~") for f in filters for w in f.split()}:
        if name.startswith("@"):
            listing = subprocess.run([SYSTEMD_ANALYZE, "syscall-filter", name], capture_output=True,
                                     text=True, check=True).stdout
            denied |= {w for w in re.findall(r"^\s+([a-z_0-9@-]+)", listing, re.M)}
        else:
            denied.add(name)
    assert not denied & {"bpf", "perf_event_open", "mount", "setrlimit", "prlimit64", "mmap",
                         "setns", "socket", "ioctl"}


def env_file_settings():
    """The file's settings, commented-out defaults included."""
    settings = {}
    for line in ENV_FILE.read_text().splitlines():
        match = re.match(r"^#?([A-Z][A-Z0-9_]*)=(.*)$", line)
        if match:
            settings[match.group(1)] = match.group(2)
    return settings


def test_environment_file_names_only_settings_the_agent_reads(monkeypatch):
    settings = env_file_settings()
    assert settings, "the file shows no setting"
    from nodemesh.cli import build_parser
    for key in [k for k in os.environ if k.startswith("NODEMESH_")]:
        monkeypatch.delenv(key)
    for key, value in settings.items():
        assert key.startswith("NODEMESH_"), key
        monkeypatch.setenv(key, value)
    args = build_parser().parse_args(service("ExecStart").split()[1:])
    for key, value in settings.items():
        option = key[len("NODEMESH_"):].lower()
        assert str(getattr(args, option, None)) == value, f"{key} is not read by `nodemesh run`"


def test_environment_file_keeps_pins_and_socket_where_the_unit_may_write():
    settings = env_file_settings()
    assert settings["NODEMESH_BPFFS"].startswith("/sys/fs/bpf/")
    assert settings["NODEMESH_ADMIN_SOCKET"].startswith("/run/nodemesh/")


# --- scripts/install-host.sh -----------------------------------------------------------

def fake_venv(tmp_path):
    """A venv stand-in whose nodemesh prints its arguments."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin/nodemesh").write_text('#!/bin/sh\necho "nodemesh $*"\n')
    (venv / "bin/nodemesh").chmod(0o755)
    return venv


def install(tmp_path, destdir, script=INSTALL, **env):
    """Runs the installer with a systemctl on PATH that records every call."""
    spy = tmp_path / "spy"
    spy.mkdir(exist_ok=True)
    (spy / "systemctl").write_text(f'#!/bin/sh\necho "$*" >> {spy}/calls\n')
    (spy / "systemctl").chmod(0o755)
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PATH": f"{spy}:{os.environ['PATH']}",
                                 "DESTDIR": str(destdir), **env})
    assert result.returncode == 0, result.stdout + result.stderr
    calls = (spy / "calls").read_text() if (spy / "calls").exists() else ""
    return result, calls


def test_install_stages_the_unit_environment_configs_and_command(tmp_path):
    dest, venv = tmp_path / "dest", fake_venv(tmp_path)
    result, systemctl_calls = install(tmp_path, dest, NODEMESH_VENV=str(venv))
    assert (dest / "etc/systemd/system/nodemesh.service").read_text() == UNIT.read_text()
    assert (dest / "etc/nodemesh/nodemesh.env").read_text() == ENV_FILE.read_text()
    assert (dest / "etc/nodemesh/config.example.yaml").read_text() == \
        (ROOT / "deploy/examples/config.yaml").read_text()
    from nodemesh import config
    assert config.load(str(dest / "etc/nodemesh/config.yaml")) == []  # takes over no address
    assert sorted(p.name for p in (dest / "usr/share/nodemesh/bpf").iterdir()) == \
        sorted(p.name for p in (ROOT / "bpf").iterdir())
    # The command runs the venv's nodemesh with the arguments it was given.
    ran = subprocess.run([str(dest / "usr/local/bin/nodemesh"), "status", "-o", "json"],
                         capture_output=True, text=True, check=True)
    assert ran.stdout == "nodemesh status -o json\n"
    assert "systemctl daemon-reload && systemctl enable --now nodemesh" in result.stdout
    # A staged install never touches the running system's systemd.
    assert systemctl_calls == ""


def test_install_keeps_the_admins_config_and_environment_but_replaces_the_unit(tmp_path):
    dest, venv = tmp_path / "dest", fake_venv(tmp_path)
    (dest / "etc/nodemesh").mkdir(parents=True)
    (dest / "etc/nodemesh/config.yaml").write_text("services: []  # mine\n")
    (dest / "etc/nodemesh/nodemesh.env").write_text("NODEMESH_LOG_LEVEL=debug\n")
    (dest / "etc/systemd/system").mkdir(parents=True)
    (dest / "etc/systemd/system/nodemesh.service").write_text("[Service]\nExecStart=/old\n")
    install(tmp_path, dest, NODEMESH_VENV=str(venv))
    assert (dest / "etc/nodemesh/config.yaml").read_text() == "services: []  # mine\n"
    assert (dest / "etc/nodemesh/nodemesh.env").read_text() == "NODEMESH_LOG_LEVEL=debug\n"
    assert (dest / "etc/systemd/system/nodemesh.service").read_text() == UNIT.read_text()


def test_install_refuses_a_venv_without_nodemesh(tmp_path):
    (tmp_path / "empty-venv").mkdir()
    result = subprocess.run(["bash", str(INSTALL)], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "DESTDIR": str(tmp_path / "dest"),
                                 "NODEMESH_VENV": str(tmp_path / "empty-venv")})
    assert result.returncode != 0 and "has no bin/nodemesh" in result.stderr


@pytest.mark.slow
def test_install_puts_the_project_into_a_venv_under_opt_nodemesh(tmp_path):
    # Offline: dependencies are not installed (PIP_NO_DEPS) and the wheel is built with the
    # setuptools the new venv already has (no build isolation, no index). From a copy of
    # the checkout: the build writes its metadata next to pyproject.toml.
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for part in ("pyproject.toml", "agent", "bpf", "deploy", "scripts"):
        copy = shutil.copytree if (ROOT / part).is_dir() else shutil.copy2
        copy(ROOT / part, checkout / part)
    dest = tmp_path / "dest"
    install(tmp_path, dest, script=checkout / "scripts/install-host.sh",
            PIP_NO_INDEX="1", PIP_NO_DEPS="1", PIP_NO_BUILD_ISOLATION="0")
    venv = dest / "opt/nodemesh/venv"
    assert "include-system-site-packages = true" in (venv / "pyvenv.cfg").read_text()
    assert (venv / "bin/nodemesh").exists()
    found = subprocess.run([str(venv / "bin/python"), "-c", "import nodemesh; print(nodemesh.__file__)"],
                           capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert found.startswith(str(venv / "lib")), found  # installed, not the checkout
    assert (dest / "usr/local/bin/nodemesh").read_text().splitlines()[-1] == \
        'exec /opt/nodemesh/venv/bin/nodemesh "$@"'
