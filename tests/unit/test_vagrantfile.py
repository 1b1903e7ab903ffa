"""The Vagrantfile: `vagrant validate` accepts it, and Vagrant itself reports the box, the
providers, the /vagrant rsync folder and the two provisioners (`setup` on `vagrant up`,
`test` only when asked for). Needs Debian's vagrant; the provider blocks are validated
too when vagrant-libvirt is installed. Nothing is booted."""
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VAGRANTFILE = ROOT / "Vagrantfile"
VAGRANT = shutil.which("vagrant")
needs_vagrant = pytest.mark.skipif(VAGRANT is None,
                                   reason="vagrant is not installed (Debian package vagrant)")

# Loaded in place of the real Vagrantfile: wraps Vagrant.configure so that, once the real
# file's block has filled in the config, the parts under test are written out as JSON.
# Vagrant may evaluate this file more than once: wrap only once.
DUMPER = """
require "json"
module Vagrant
  class << self
    alias_method :__nodemesh_configure, :configure unless method_defined?(:__nodemesh_configure)
    def configure(version, &block)
      __nodemesh_configure(version) do |config|
        block.call(config)
        vm = config.vm
        File.write(ENV.fetch("NODEMESH_VAGRANT_DUMP"), JSON.generate(
          box: vm.box,
          providers: vm.instance_variable_get(:@__providers).keys.map(&:to_s),
          synced_folders: vm.synced_folders.values.map { |o|
            {guestpath: o[:guestpath], hostpath: o[:hostpath], type: o[:type].to_s,
             exclude: o[:rsync__exclude]} },
          provisioners: vm.provisioners.map { |p|
            {name: p.name.to_s, type: p.type.to_s, run: p.run && p.run.to_s,
             inline: p.config.inline} }))
      end
    end
  end
end
load %s
"""


def vagrant(args, cwd, tmp_path, **env):
    # A private VAGRANT_HOME and dotfile folder: nothing lands in ~/.vagrant.d or the tree.
    return subprocess.run([VAGRANT, *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "VAGRANT_HOME": str(tmp_path / "home"),
                               "VAGRANT_DOTFILE_PATH": str(tmp_path / "dot"),
                               "VAGRANT_CHECKPOINT_DISABLE": "1", "VAGRANT_NO_COLOR": "1", **env})


def libvirt_plugin_installed(tmp_path):
    listing = vagrant(["plugin", "list"], ROOT, tmp_path).stdout
    return "vagrant-libvirt" in listing


@pytest.mark.slow
@needs_vagrant
def test_vagrant_validate_accepts_the_vagrantfile(tmp_path):
    # Without a provider plugin Vagrant cannot load a provider's settings: skip just those.
    args = ["validate"] if libvirt_plugin_installed(tmp_path) else ["validate", "--ignore-provider"]
    result = vagrant(args, ROOT, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "validated successfully" in result.stdout


@needs_vagrant
def test_vagrant_validate_rejects_a_broken_provisioner(tmp_path):
    # The check has teeth: an unknown provisioner type is a validation error.
    (tmp_path / "project").mkdir()
    (tmp_path / "project/Vagrantfile").write_text(
        VAGRANTFILE.read_text().replace('"test", type: "shell"', '"test", type: "shel"'))
    result = vagrant(["validate", "--ignore-provider"], tmp_path / "project", tmp_path)
    assert result.returncode != 0


@needs_vagrant
def test_vagrant_sees_the_box_providers_synced_folder_and_provisioners(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "Vagrantfile").write_text(DUMPER % json.dumps(str(VAGRANTFILE)))
    dump = tmp_path / "dump.json"
    result = vagrant(["validate", "--ignore-provider"], project, tmp_path,
                     NODEMESH_VAGRANT_DUMP=str(dump))
    assert result.returncode == 0, result.stdout + result.stderr
    config = json.loads(dump.read_text())

    assert config["box"] in ("debian/bookworm64", "generic/debian12")
    assert {"libvirt", "virtualbox"} <= set(config["providers"])

    (folder,) = config["synced_folders"]
    assert (folder["hostpath"], folder["guestpath"], folder["type"]) == (".", "/vagrant", "rsync")
    # `vagrant rsync` (rsync --delete) must not wipe the VM's own venv.
    assert {".venv/", ".git/"} <= set(folder["exclude"])

    provisioners = {p["name"]: p for p in config["provisioners"]}
    assert list(provisioners) == ["setup", "test"]
    # `vagrant up` runs setup (the default, once); `test` runs only with --provision-with.
    assert provisioners["setup"]["run"] in (None, "once")
    assert "sudo make -C /vagrant setup" in provisioners["setup"]["inline"]
    assert provisioners["test"]["run"] == "never"
    assert provisioners["test"]["inline"].strip() == "sudo make -C /vagrant test"


def test_vagrantfile_names_a_public_debian_box_and_both_providers():
    # Without vagrant: the same facts, read from the text.
    text = VAGRANTFILE.read_text()
    assert re.search(r'config\.vm\.box = "(debian/bookworm64|generic/debian12)"', text)
    assert 'config.vm.provider "libvirt"' in text and 'config.vm.provider "virtualbox"' in text
    assert re.search(r'config\.vm\.provision "test", type: "shell", run: "never"', text)
