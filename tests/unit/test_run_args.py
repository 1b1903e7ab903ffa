"""`nodemesh run` refuses bad options up front (issue 7 item 11): exit 2 with one line naming
the option, no traceback, nothing created; from the command line and from NODEMESH_*.

In-process tests only parse: should a check go missing, they fail instead of starting an
agent (as root, on the default pins and the root cgroup)."""
import pytest
from helpers import cli

from nodemesh.cli import build_parser

LONG_SOCKET = "/run/nodemesh/" + "s" * 94 + ".sock"  # 113 bytes: more than sun_path holds

BAD = [
    (["--metrics-addr", "127.0.0.1"], "--metrics-addr"),
    (["--metrics-addr", ":99999"], "--metrics-addr"),
    (["--metrics-addr", "foo:bar"], "--metrics-addr"),
    (["--metrics-addr", "::1:9464"], "--metrics-addr"),  # ambiguous: brackets say where
    (["--metrics-addr", "[nope]:9464"], "--metrics-addr"),
    (["--metrics-addr", "a b:9464"], "--metrics-addr"),
    (["--resync-seconds", "abc"], "--resync-seconds"),
    (["--resync-seconds", "0"], "--resync-seconds"),
    (["--resync-seconds", "-5"], "--resync-seconds"),
    (["--resync-seconds", "nan"], "--resync-seconds"),
    (["--resync-seconds", "inf"], "--resync-seconds"),
    (["--map-backends", "abc"], "--map-backends"),
    (["--map-backends", "0"], "--map-backends"),
    (["--map-frontends", "1"], "--map-frontends"),  # id 0 is reserved: no frontend would fit
    (["--map-service-entries", "-1"], "--map-service-entries"),
    (["--map-revnat", "4294967296"], "--map-revnat"),
    (["--admin-socket", LONG_SOCKET], "--admin-socket"),
    (["--admin-socket", ""], "--admin-socket"),
    (["--source", "etcd"], "--source"),
]


def parse_error(capsys, argv):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def run_error(capsys, argv):
    return parse_error(capsys, ["run", "--config", "c.yaml", *argv])


@pytest.mark.parametrize("argv,option", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_a_bad_option_is_one_line_naming_it(capsys, argv, option):
    assert run_error(capsys, argv).startswith(f"nodemesh run: error: argument {option}: ")


@pytest.mark.parametrize("argv,option", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_the_environment_goes_through_the_same_checks(capsys, monkeypatch, argv, option):
    flag, value = argv
    monkeypatch.setenv("NODEMESH_" + flag[2:].upper().replace("-", "_"), value)
    assert run_error(capsys, []).startswith(f"nodemesh run: error: argument {option}: ")


def test_a_bad_log_level_in_the_environment_is_one_line_too(capsys, monkeypatch):
    monkeypatch.setenv("NODEMESH_LOG_LEVEL", "chatty")
    assert parse_error(capsys, ["run", "--config", "c.yaml"]).startswith(
        "nodemesh: error: argument --log-level: ")


def test_the_messages_say_what_is_accepted(capsys):
    assert "0-65535" in run_error(capsys, ["--metrics-addr", ":99999"])
    assert "[::1]:9464" in run_error(capsys, ["--metrics-addr", "::1:9464"])
    assert "positive" in run_error(capsys, ["--resync-seconds", "0"])
    assert "2 to 16777216" in run_error(capsys, ["--map-backends", "0"])
    assert "1 to 107 bytes; this one has 113" in run_error(capsys, ["--admin-socket", LONG_SOCKET])


@pytest.mark.parametrize("addr", ["127.0.0.1:9464", "0.0.0.0:9464", ":9464", "[::1]:9464",
                                  "[::]:1", "localhost:65535", "127.0.0.1:0"])
def test_good_metrics_addresses_are_kept_as_given(addr):
    args = build_parser().parse_args(["run", "--metrics-addr", addr])
    assert args.metrics_addr == addr


def test_numbers_arrive_typed_from_flags_and_the_environment(monkeypatch):
    monkeypatch.setenv("NODEMESH_RESYNC_SECONDS", "2.5")
    monkeypatch.setenv("NODEMESH_MAP_REVNAT", "1024")
    args = build_parser().parse_args(["run", "--map-backends", "2"])
    assert (args.resync_seconds, args.map_revnat, args.map_backends) == (2.5, 1024, 2)
    socket_path = "/run/" + "s" * 102  # 107 bytes: the most sun_path takes with its NUL
    assert build_parser().parse_args(["run", "--admin-socket", socket_path]).admin_socket == \
        socket_path


def test_a_refused_option_creates_nothing(tmp_path):
    # Before this was checked up front, the pins were made before bind() said "too long".
    pins = tmp_path / "pins"
    res = cli("run", "--config", str(tmp_path / "c.yaml"), "--bpffs", str(pins),
              "--cgroup", str(tmp_path), "--admin-socket", str(tmp_path / ("s" * 110)))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith(
        "nodemesh run: error: argument --admin-socket: ")
    assert "Traceback" not in res.stderr
    assert list(tmp_path.iterdir()) == []
