"""Hostile configs (issue 7): every input gives services or a ConfigError naming the field or
the line, never another exception, a hang or unbounded memory; `nodemesh check` exits 1 with
one line per problem, and `-o json` always prints JSON."""
import json
import os
import random
import resource
import subprocess
import sys

import pytest
from helpers import ROOT, TIME_SCALE

from nodemesh import cli, config

SERVICE = "services:\n  - name: web\n    vip: 10.96.0.10\n    ports: [{port: 80}]\n"


def laughs(levels=9):
    """The 'billion laughs': each level is 9 aliases of the one before."""
    out = ['l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    out += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(out) + "\n"


# (case, file content, the field path of the problem, words of its message)
HOSTILE = [
    ("custom tag", SERVICE.replace("name: web", "name: !foo web"), "services[0].name",
     "the tag !foo is not supported"),
    ("!!map on a scalar", SERVICE.replace("vip: 10.96.0.10", "vip: !!map x"), "services[0].vip",
     "the tag !!map is not supported"),
    ("custom tag on a list", "services: !foo []\n", "services", "not supported on a list"),
    ("python object tag", "services: !!python/object/apply:os.system [true]\n", "services",
     "not supported"),
    ("timestamp tag", SERVICE.replace("name: web", "name: !!timestamp 2020-13-45"),
     "services[0].name", "the tag !!timestamp is not supported"),
    ("bad explicit int", SERVICE.replace("port: 80", "port: !!int eighty"),
     "services[0].ports[0].port", "'eighty' is not a valid !!int"),
    ("bad explicit bool", SERVICE + "    terminateConnectionsOnRemoval: !!bool maybe\n",
     "services[0].terminateConnectionsOnRemoval", "'maybe' is not a boolean"),
    ("empty explicit float", SERVICE + "    panicThresholdPercent: !!float ''\n",
     "services[0].panicThresholdPercent", "is not a valid !!float"),
    ("recursive alias", "services: &s [*s]\n", "services[0]", "recursive alias"),
    ("undefined alias", "services: *nowhere\n", "services", "has no anchor &nowhere"),
    ("5,000-digit integer", SERVICE.replace("port: 80", "port: " + "9" * 5000),
     "services[0].ports[0].port", "a number of 5000 characters is too long"),
    ("deep nesting", "services: " + "[" * 100 + "]" * 100 + "\n", "services" + "[0]" * 63,
     "nested deeper than 64 levels"),
    ("merge key", "base: &b {port: 80}\nservices: [{<<: *b}]\n", "services[0]",
     "merge keys (<<) are not supported"),
    ("list as a key", "? [a, b]\n: c\n", "", "a mapping key must be a plain value"),
    ("duplicate key", SERVICE + "    vip: 10.96.0.11\n", "services[0].vip", "is given twice"),
    ("two documents", SERVICE + "---\nservices: []\n", "", "one YAML document"),
    ("NUL byte", "services: []\x00\n", "", "control characters are not allowed"),
    ("not UTF-8", b"services: [\xff]\n", "", "not YAML text"),
    ("scoped VIP", SERVICE.replace("10.96.0.10", '"fd00::10%eth0"'), "services[0].vip",
     "is a scoped IPv6 address"),
    ("long unknown key", "? " + "k" * 5000 + "\n: 1\n", "'kkkkkkkkkkkkkk", "unknown field"),
]


@pytest.fixture
def check(tmp_path, capsys):
    """nodemesh check in this process: (exit code, stdout, stderr)."""
    def run(content, *args):
        f = tmp_path / "hostile.yaml"
        f.write_bytes(content if isinstance(content, bytes) else content.encode())
        code = cli.main(["check", "--config", str(f), *args])
        out = capsys.readouterr()
        return code, out.out, out.err
    return run


@pytest.mark.parametrize("content, path, words", [c[1:] for c in HOSTILE],
                         ids=[c[0] for c in HOSTILE])
def test_check_refuses_a_hostile_config_with_the_field_named(check, content, path, words):
    code, out, err = check(content)
    assert code == 1 and out == ""
    assert "Traceback" not in err and words in err
    assert err.count("\n") == 1 and "hostile.yaml" in err  # one line, naming the file
    code, out, _ = check(content, "-o", "json")
    doc = json.loads(out)
    assert code == 1 and doc["valid"] is False and doc["file"].endswith("hostile.yaml")
    (problem,) = doc["problems"]
    assert problem["path"].startswith(path) and words in problem["message"]
    assert set(problem) == {"path", "line", "message"}


@pytest.mark.parametrize("text", ["services: [\ud800]\n", "services: ['\udfff']\n"])
def test_text_that_cannot_be_utf8_is_a_config_error(text):
    with pytest.raises(config.ConfigError) as e:
        config.parse(text, "s.yaml")
    assert "s.yaml:1: not UTF-8 text" in str(e.value)
    assert e.value.problems[0].line == 1


def _limited_check(path, *args, memory=1 << 30):
    """`nodemesh check` in a child with at most `memory` bytes of address space. What proves a
    limit is its message (an attack let through runs out of memory or recurses, and dies with
    a traceback); the 60 s only end a child that hangs (a FIFO read, say). It was 5 s, which
    the child's start-up alone took at load 18 on 2 CPUs."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    return subprocess.run([sys.executable, "-m", "nodemesh.cli", "check", "--config", str(path),
                           *args], capture_output=True, text=True, cwd=ROOT, preexec_fn=limit,
                          timeout=60 * TIME_SCALE)


@pytest.mark.parametrize("content, message", [
    (laughs(), "aliases expand to more than 100,000 values (a 'billion laughs' document?)"),
    (laughs(12), "aliases expand to more than 100,000 values"),
    ("a: " + "[" * 999 + "]" * 999 + "\n", "nested deeper than 64 levels"),
    ("- " * 100_000 + "x\n", "nested deeper than 64 levels"),
], ids=["billion laughs", "twelve levels", "999 nested lists", "100,000 nested block lists"])
def test_resource_attacks_end_quickly_in_bounded_memory(tmp_path, content, message):
    f = tmp_path / "attack.yaml"
    f.write_text(content)
    res = _limited_check(f, "-o", "json")
    assert res.returncode == 1, res.stderr
    out = json.loads(res.stdout)
    assert out["valid"] is False and message in out["problems"][0]["message"]


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "services.yaml"
    os.mkfifo(fifo)
    res = _limited_check(fifo, "-o", "json")
    assert res.returncode == 1
    assert json.loads(res.stdout)["problems"][0]["message"].startswith("is not a regular file")


def test_a_device_is_refused_without_reading_it():
    res = _limited_check("/dev/zero")  # read, it would fill the memory
    assert res.returncode == 1
    assert res.stderr == "/dev/zero: is not a regular file (a FIFO, socket or device?)\n"


def test_a_file_over_the_size_cap_is_refused_unread(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "MAX_FILE_BYTES", 1 << 20)
    f = tmp_path / "big.yaml"
    f.write_text("services: []\n" + "#" * (1 << 20) + "\n")
    with pytest.raises(config.ConfigError) as e:
        config.load(str(f))
    assert str(e.value) == f"{f}: is larger than 1 MiB, the most a config may be"
    f.write_text("services: []\n" + "#" * ((1 << 20) - 20) + "\n")
    assert config.load(str(f)) == []


def big_config(n):
    """n services with 3 backends each, as a large node has them."""
    parts = ["services:\n"]
    for i in range(n):
        a, b = divmod(i, 250)
        parts.append(f"  - name: svc-{i}\n    namespace: bench\n    vip: 10.{96 + a // 250}."
                     f"{a % 250}.{b + 1}\n    ports:\n      - {{name: http, port: 80, "
                     f"targetPort: 8080, protocol: TCP}}\n    backends:\n" +
                     "".join(f"      - {{address: 10.{200 + j}.{a % 250}.{b + 1}, weight: 1}}\n"
                             for j in range(3)))
    return "".join(parts)


def test_the_size_cap_leaves_room_for_100000_services():
    assert len(big_config(100_000).encode()) * 2 < config.MAX_FILE_BYTES
    assert len(config.parse(big_config(1000))) == 1000  # and that file is a valid config


def test_aliases_within_the_budget_still_work():
    text = ("services:\n  - {name: s0, vip: 10.96.0.1, ports: [{port: 80}], "
            "healthCheck: &hc {type: http, path: /healthz}}\n" +
            "".join(f"  - {{name: s{i}, vip: 10.96.0.{i + 1}, ports: [{{port: 80}}], "
                    f"healthCheck: *hc}}\n" for i in range(1, 100)))
    services = config.parse(text)
    assert len(services) == 100 and all(s.health_check.path == "/healthz" for s in services)


def test_random_damage_to_a_config_gives_services_or_a_config_error():
    good = ("services:\n  - name: web\n    namespace: demo\n    vip: 10.96.0.10\n"
            "    ports: [{name: http, port: 80, targetPort: 8080}, {port: 53, protocol: UDP}]\n"
            "    healthCheck: {type: http, path: /healthz}\n    backends:\n"
            "      - &b {address: 10.200.1.2, weight: 1}\n      - {address: 10.200.1.3}\n"
            "  - {name: six, vip: 'fd00::10', ports: [{port: 80}], "
            "backends: [{address: 'fd00::2'}]}\n").encode()
    rng = random.Random(7)
    alphabet = b" \n\t:-[]{},&*!%|>'\"#?<=~0123456789.abcxyz\x00\xff"
    for _ in range(3000):
        data = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(len(data))
            op = rng.randrange(3)
            if op == 0:
                data[pos] = rng.choice(alphabet)
            elif op == 1:
                data.insert(pos, rng.choice(alphabet))
            else:
                del data[pos]
        try:
            config.parse(bytes(data), "fuzz.yaml")
        except config.ConfigError as e:
            assert e.problems and all(p.message for p in e.problems)
