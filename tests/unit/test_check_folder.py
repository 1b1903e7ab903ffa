"""`nodemesh check --config DIR`: every file validated and reported, as `run` reads them."""
import json

import pytest

from nodemesh import cli

WEB = ("services: [{name: web, vip: 10.96.0.1, ports: [{port: 80}], "
       "backends: [{address: 10.0.0.1}]}]\n")
DB = "services: [{name: db, vip: 10.96.0.2, ports: [{port: 5432}, {port: 5433}]}]\n"


@pytest.fixture
def check(capsys):
    def run(*args):
        code = cli.main(["check", *args])
        out = capsys.readouterr()
        return code, out.out, out.err
    return run


def test_a_good_folder_is_valid_with_its_totals(tmp_path, check):
    (tmp_path / "a.yaml").write_text(WEB)
    (tmp_path / "b.yml").write_text(DB)
    (tmp_path / ".b.yml.swp").write_text("not yaml: [")
    code, out, err = check("--config", str(tmp_path))
    assert code == 0 and err == ""
    assert out == f"{tmp_path}: valid (2 services, 3 frontends in 2 files)\n"
    code, out, _ = check("--config", str(tmp_path), "-o", "json")
    doc = json.loads(out)
    assert code == 0 and doc["valid"] is True and (doc["services"], doc["frontends"]) == (2, 3)
    assert [(f["file"], f["valid"], f["problems"]) for f in doc["files"]] == [
        (str(tmp_path / "a.yaml"), True, []), (str(tmp_path / "b.yml"), True, [])]


def test_each_bad_file_is_reported_and_a_duplicate_names_both_files(tmp_path, check):
    (tmp_path / "a.yaml").write_text(WEB)
    (tmp_path / "b.yaml").write_text("services: [{name: x, vip: nope, ports: [{port: 80}]}]\n")
    (tmp_path / "c.yaml").write_text(WEB.replace("10.96.0.1", "10.96.0.9"))
    (tmp_path / "d.yaml").write_text(DB)
    code, out, err = check("--config", str(tmp_path))
    assert code == 1 and out == ""
    assert err.splitlines() == [
        f"{tmp_path / 'b.yaml'}:1: services[0].vip: 'nope' is not an IPv4 or IPv6 address "
        f"(a virtual IP)",
        f"{tmp_path / 'c.yaml'}: services[0].name: service default/web is defined twice "
        f"(also {tmp_path / 'a.yaml'} services[0])",
        f"{tmp_path}: 2 of 4 files invalid"]
    code, out, _ = check("--config", str(tmp_path), "-o", "json")
    doc = json.loads(out)
    assert code == 1 and doc["valid"] is False
    assert [f["valid"] for f in doc["files"]] == [True, False, False, True]
    assert doc["files"][2]["problems"][0]["path"] == "services[0].name"
    assert (doc["services"], doc["frontends"]) == (2, 3)  # of the good files


def test_a_single_file_keeps_its_json_shape(tmp_path, check):
    f = tmp_path / "one.yaml"
    f.write_text(WEB)
    code, out, _ = check("--config", str(f), "-o", "json")
    assert code == 0 and json.loads(out) == {"valid": True, "file": str(f), "services": 1,
                                             "frontends": 1}
