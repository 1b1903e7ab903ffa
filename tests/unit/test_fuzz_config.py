"""Property tests of the config reader and validator (issue 14): whatever the input, parse()
gives services that fit the datapath or a ConfigError whose every problem names a field or a
line; `nodemesh check -o json` prints JSON for all of it. Hand-picked hostile inputs are in
test_config_hostile.py; here hypothesis generates them."""
import ipaddress
import json

import pytest
import yaml
from fuzzing import FUZZ, MUTATIONS, ODD_STRINGS, assert_programmable, mutated, values
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from nodemesh import cli, config, reserved


def parse(data):
    """config.parse, checked: the services it returns fit the datapath, and a ConfigError
    says what and where for every problem. Returns the services, or None."""
    try:
        services = config.parse(data, "fuzz.yaml")
    except config.ConfigError as e:
        assert e.problems and str(e)
        for problem in e.problems:
            assert isinstance(problem.message, str) and problem.message
            assert problem.path or problem.line, problem
            assert problem.line is None or problem.line >= 1
        return None
    for service in services:
        assert_programmable(service)
    return services


# -- valid configs, built field by field

# DNS-1123 labels: the edge cases by name (a regex strategy draws them a character at a time,
# and generation is most of these tests' time), numbered ones for uniqueness.
LABEL = st.sampled_from(["a", "0", "9z", "a-b", "a--0", "web", "api-v2", "x" * 63,
                         "a" + "-" * 61 + "b"]) | st.integers(0, 999).map("svc-{}".format)
# Addresses both a VIP and a backend may be: 1.x-223.x (0/8 and 224+ are refused), global and
# unique-local IPv6; written canonical or not (the config canonicalises them).
V4 = st.tuples(st.integers(1, 223), st.integers(0, 255), st.integers(0, 255),
               st.integers(0, 255)).map(lambda t: "%d.%d.%d.%d" % t)
V6 = st.one_of(st.ip_addresses(v=6, network="2000::/3"), st.ip_addresses(v=6, network="fd00::/8"))


# A VIP must also not capture the node's own traffic (loopback, link-local, the node's own
# addresses: reserved.py); the refusal itself is tested in test_config.py.
VIP4 = V4.filter(lambda a: reserved.reserved_vip(a) is None)
VIP6 = V6.filter(lambda a: reserved.reserved_vip(a.compressed) is None)


def v6_text(address):
    return st.sampled_from([address.compressed, address.exploded, address.exploded.upper()])


@st.composite
def valid_service(draw):
    six = draw(st.booleans())
    vip = draw(VIP6.flatmap(v6_text) if six else VIP4)
    service = {"name": draw(LABEL), "vip": vip}
    if draw(st.booleans()):
        service["namespace"] = draw(LABEL)
    frontends = draw(st.lists(st.tuples(st.integers(1, 65535), st.sampled_from(["TCP", "UDP"])),
                              min_size=1, max_size=3, unique=True))
    names = draw(st.lists(LABEL, min_size=len(frontends), max_size=len(frontends), unique=True))
    ports = []
    for (number, protocol), name in zip(frontends, names):
        port = {"port": number}
        for key, value in (("protocol", protocol), ("name", name),
                           ("targetPort", draw(st.integers(1, 65535)))):
            if draw(st.booleans()) or (key == "protocol" and protocol == "UDP"):
                port[key] = value
        ports.append(port)
    service["ports"] = ports
    backends = []
    for address in draw(st.lists(V6 if six else V4, max_size=4, unique=True)):
        backend = {"address": draw(v6_text(address)) if six else address}
        # Mostly small weights: a round-robin sequence of big ones takes ~50 ms to check.
        for key, strategy in (("weight", st.integers(0, 100) | st.just(65535)), ("node", LABEL),
                              ("zone", LABEL), ("ready", st.booleans()),
                              ("serving", st.booleans()), ("terminating", st.booleans())):
            if draw(st.booleans()):
                backend[key] = draw(strategy)
        backends.append(backend)
    if backends and all(b.get("weight", 1) == 0 for b in backends):
        backends[0]["weight"] = 1
    if backends or draw(st.booleans()):
        service["backends"] = backends
    optional = {
        "algorithm": st.sampled_from(["random", "round_robin"]),
        "sessionAffinity": st.builds(lambda t: {"clientIP": {"timeoutSeconds": t}},
                                     st.integers(1, 86400)),
        "healthCheck": st.fixed_dictionaries({}, optional={
            "type": st.sampled_from(["tcp", "http"]), "path": st.just("/healthz"),
            "intervalSeconds": st.floats(0.1, 3600), "timeoutSeconds": st.floats(0.05, 3600),
            "unhealthyThreshold": st.integers(1, 100), "port": st.integers(1, 65535)}),
        "outlierDetection": st.fixed_dictionaries({}, optional={
            "consecutiveFailures": st.integers(1, 1000),
            "baseEjectionSeconds": st.floats(0.1, 86400),
            "maxEjectionPercent": st.integers(0, 100)}),
        "panicThresholdPercent": st.integers(0, 100),
        "trafficPolicy": st.builds(lambda p: {"internal": p}, st.sampled_from(["Cluster", "Local"])),
        "trafficDistribution": st.just("PreferClose"),
        "terminateConnectionsOnRemoval": st.booleans(),
    }
    for key, strategy in optional.items():
        if draw(st.booleans()):
            service[key] = draw(strategy)
    return service


def _vip(service):
    return ipaddress.ip_address(service["vip"]).compressed


# Service keys and VIPs are unique, so no two services claim a name or a frontend.
valid_documents = st.lists(valid_service(), max_size=3, unique_by=(
    lambda s: (s.get("namespace", "default"), s["name"]), _vip)).map(lambda s: {"services": s})
DUMP_STYLES = st.sampled_from([{"default_flow_style": False}, {"default_flow_style": True},
                               {"default_flow_style": None}])


def dump(document, style):
    return yaml.dump(document, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper),
                     sort_keys=False, allow_unicode=True, **style)


@pytest.mark.slow
@settings(FUZZ, max_examples=150)
@given(valid_documents, DUMP_STYLES)
def test_a_valid_config_loads_and_every_frontend_fits_the_datapath(document, style):
    services = parse(dump(document, style))
    assert services is not None, dump(document, style)
    assert [(s.namespace, s.name, s.vip) for s in services] == [
        (d.get("namespace", "default"), d["name"], _vip(d)) for d in document["services"]]
    for service, raw in zip(services, document["services"]):
        assert [(p.port, p.protocol) for p in service.ports] == [
            (p["port"], p.get("protocol", "TCP")) for p in raw["ports"]]
        assert [b.address for b in service.backends] == [
            ipaddress.ip_address(b["address"]).compressed for b in raw.get("backends", [])]


# -- hostile input

# Field names and near misses, for the keys mutation adds.
KEYS = st.sampled_from(list(config.SERVICE_FIELDS + config.PORT_FIELDS + config.BACKEND_FIELDS +
                            config.HEALTH_FIELDS + config.OUTLIER_FIELDS) +
                       ["services", "Name", "vip ", "clientIP", "internal", "<<", ""]) | \
    st.text(max_size=8)
# YAML's own constructs, spliced into the text: tags, anchors and aliases, merge keys,
# document markers, directives, flow and block indicators.
TOKENS = st.sampled_from([
    "!!int ", "!!str ", "!!float ", "!!bool ", "!!null ", "!!map ", "!!seq ", "!!binary ",
    "!!timestamp ", "!!set ", "!!omap ", "!foo ", "! ", "!<tag:x> ", "!!python/object:os.system ",
    "&a ", "*a ", "*b ", "&a [*a] ", "<<: *a\n", "<<: ", "? ", "---\n", "...\n", "%YAML 1.1\n",
    "%TAG ! tag:x,\n", "[", "]", "{", "}", ",", "'", '"', "#", "|", ">", "- ", ": ", "\t", "\n",
    "\ufeff", "\x85", "\r", "\\", "\\u12", "9" * 70, "0b", "0x", "-", "1:", "~", ".", "@", "`",
])


@st.composite
def spliced(draw, text):
    """`text` with one to four YAML tokens inserted where a key, a value or an item starts
    (inside a word they mostly make an unknown field)."""
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.sampled_from([0] + [i + 1 for i, c in enumerate(text) if c in " \n[{,"]))
        text = text[:at] + draw(TOKENS) + text[at:]
    return text


@st.composite
def damaged_bytes(draw, data):
    """`data` with one to four bytes changed, inserted or deleted."""
    data = bytearray(data or b"\n")
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data) - 1))
        operation = draw(st.sampled_from(["set", "insert", "delete"]))
        if operation == "delete" and len(data) > 1:
            del data[at]
        else:
            byte = draw(st.sampled_from(list(b" \n:-[]{},&*!%|>'\"#?<=~0az.\\")) |
                        st.integers(0, 255))
            if operation == "set":
                data[at] = byte
            else:
                data.insert(at, byte)
    return bytes(data)


# Mutations go into the services list, not the document around it (that is one field, and
# the text tests reach it); deep nesting and a list holding itself are rarer.
mutated_documents = st.tuples(valid_documents, DUMP_STYLES).flatmap(
    lambda pair: mutated(pair[0]["services"], new_values=values | st.sampled_from(ODD_STRINGS),
                         keys=KEYS, operations=MUTATIONS * 3 + ("deep", "loop")).map(
        lambda services: dump({"services": services}, pair[1])))
spliced_documents = st.tuples(valid_documents, DUMP_STYLES).flatmap(
    lambda pair: spliced(dump(pair[0], pair[1])))
damaged_documents = st.tuples(valid_documents, DUMP_STYLES).flatmap(
    lambda pair: damaged_bytes(dump(pair[0], pair[1]).encode()))
YAMLISH = st.text(st.sampled_from(list(" \n\t:-[]{},&*!%|>'\"#?<=~.0123456789abcsvipor\\")) |
                  st.characters(exclude_categories=("Cc", "Cs")), max_size=200)
any_input = st.one_of(st.binary(max_size=300), st.text(st.characters(exclude_categories=()),
                                                       max_size=300), YAMLISH, YAMLISH)


@settings(FUZZ, max_examples=600)
@given(any_input)
@example("services: [\ud800]\n")  # a lone surrogate: the text strategy seldom draws one
def test_any_text_or_bytes_give_services_or_a_config_error(data):
    parse(data)


@pytest.mark.slow
@settings(FUZZ, max_examples=300)
@given(mutated_documents)
def test_a_config_with_hostile_fields_gives_services_or_a_config_error(text):
    parse(text)


@pytest.mark.slow
@settings(FUZZ, max_examples=400)
@given(spliced_documents | damaged_documents)
def test_a_config_with_yaml_tokens_spliced_in_gives_services_or_a_config_error(data):
    parse(data)


@settings(FUZZ, max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                  HealthCheck.too_slow])
@given(st.one_of(any_input, mutated_documents, spliced_documents,
                 valid_documents.map(lambda d: dump(d, {}))))
def test_check_prints_json_for_any_config(tmp_path, capsys, data):
    path = tmp_path / "services.yaml"
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass"))
    code = cli.main(["check", "--config", str(path), "-o", "json"])
    out = json.loads(capsys.readouterr().out)
    assert code in (0, 1) and out["valid"] is (code == 0) and out["file"] == str(path)
    if code:
        assert out["problems"] and all(set(p) == {"path", "line", "message"} and p["message"]
                                       for p in out["problems"])
    else:
        assert out["services"] == len(config.load(str(path)))


def test_aliases_of_a_long_string_count_by_its_length():
    # Validation reads each reference of a string whole: 400 references to a 256 KiB health
    # check path once took 10 s, 1,000 to 1 MiB 100 s (and a 64 MiB file has room for more).
    path = "/" + "x" * (256 << 10)
    text = f"p: &p '{path}'\nservices:\n" + "".join(
        f"  - {{name: s{i}, vip: 10.0.{i // 250}.{i % 250 + 1}, ports: [{{port: 80}}], "
        f"healthCheck: {{path: *p}}}}\n" for i in range(400))
    with pytest.raises(config.ConfigError) as e:
        config.parse(text)
    assert "aliases expand to more than 100,000 values" in str(e.value)
