"""Site configuration: the shipped files load, every bad value is refused naming its key, layering works."""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from pathlib import Path

import pytest

import dicomnode.cli as cli
from dicomnode.cli.config import add_config_argument, register
from dicomnode.cli.exitcodes import ExitCode
from dicomnode.config import NodeSettings, Settings, load_settings
from dicomnode.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "config" / "dicomnode.toml"
EXAMPLE = REPO / "config" / "example-site.toml"

MINIMAL = """
[node]
storage_dir = "data"

[[peers]]
name = "pacs"
ae_title = "ORTHANC"
host = "127.0.0.1"
port = 4242

[[rules]]
name = "chest"
azimuths = [-30, 30]
destinations = ["pacs"]
"""


def write(folder: Path, text: str, name: str = "site.toml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def test_shipped_defaults() -> None:
    s = load_settings(SHIPPED, env={})
    assert s.source == SHIPPED
    assert (s.node.ae_title, s.node.bind_address, s.node.port) == ("SVDRR", "127.0.0.1", 11112)
    assert s.node.storage_dir == REPO / "var"
    assert s.node.effective_database_url == f"sqlite:///{REPO / 'var' / 'dicomnode.sqlite'}"
    assert (s.node.min_free_mb, s.node.max_associations, s.node.duplicate_policy) == (512, 10, "reject")
    assert (s.node.acse_timeout_s, s.node.dimse_timeout_s, s.node.network_timeout_s) == (30.0, 60.0, 60.0)
    assert s.security.allowed_calling_ae_titles == () and s.security.require_called_ae_title
    assert not s.security.tls_enabled and s.security.tls_ca_certificates is None
    assert s.peer("pacs") == s.peers[0]
    assert (s.peers[0].ae_title, s.peers[0].host, s.peers[0].port, s.peers[0].tls) == (
        "ORTHANC",
        "127.0.0.1",
        4242,
        False,
    )
    assert s.engine.model == REPO / "models" / "demo"
    assert (s.engine.device, s.engine.dtype, s.engine.steps, s.engine.max_batch, s.engine.seed) == (
        "auto",
        "auto",
        None,
        8,
        0,
    )
    assert s.engine.guidance_scale is None  # shipped: not set, so the model's recommended values apply
    assert s.engine.dtype_for("cuda") == "bfloat16" and s.engine.dtype_for("cpu") == "float32"
    assert dataclasses.astuple(s.scheduler) == (5.0, 5, 10.0, 600.0, 1, 1.0, 10, 60.0, 0.1, 1)
    assert dataclasses.astuple(s.output)[:4] == (901, "OT", "SYNTHETIC", "dicomnode")
    assert s.loop_prevention.skip_derived == "secondary" and s.loop_prevention.skip_own_device
    (rule,) = s.rules
    assert rule.name == "chest-radiograph" and rule.enabled
    assert "1.2.840.10008.5.1.4.1.1.1.1.1" in rule.sop_classes
    assert rule.modalities == ("CR", "DX") and rule.body_parts == ("CHEST", "") and rule.view_positions == ("PA", "")
    assert rule.azimuths == (-90.0, -60.0, -30.0, 30.0, 60.0, 90.0) and rule.elevations == (0.0,) * 6
    assert rule.destinations == ("pacs",)


def test_shipped_file_documents_every_key() -> None:
    """Every setting has a line in the shipped file (style practice 5: documented with its default)."""
    text = SHIPPED.read_text(encoding="utf-8")
    s = load_settings(SHIPPED, env={})
    for section in ("node", "security", "engine", "scheduler", "output", "loop_prevention"):
        assert f"[{section}]" in text
        for field in dataclasses.fields(getattr(s, section)):
            assert f"\n{field.name} = " in text, f"{section}.{field.name} undocumented"


def test_settings_are_immutable() -> None:
    s = load_settings(SHIPPED, env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.node.port = 1  # type: ignore[misc]


def test_default_path_is_cwd_config_then_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    assert load_settings(None, env={}).source == SHIPPED
    other = write(tmp_path, MINIMAL)
    assert load_settings(None, env={"DICOMNODE_CONFIG": str(other)}).source == other
    # An explicit path (--config) wins over the environment.
    assert load_settings(SHIPPED, env={"DICOMNODE_CONFIG": str(other)}).source == SHIPPED
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="configuration file not found"):
        load_settings(None, env={})


def test_example_site_loads(tmp_path: Path) -> None:
    site = tmp_path / "site"
    (site / "tls").mkdir(parents=True)
    for name in ("node.crt", "node.key", "hospital-ca.pem"):
        (site / "tls" / name).write_text("PEM placeholder\n")
    shutil.copy(EXAMPLE, site / "site.toml")
    s = load_settings(site / "site.toml", env={})
    assert s.node.database_url.startswith("postgresql://")
    assert s.security.tls_enabled and s.security.tls_certificate == site / "tls" / "node.crt"
    assert s.security.allowed_calling_ae_titles == ("CR_ROOM1", "DX_ROOM2", "PACS_MAIN")
    assert [p.name for p in s.peers] == ["pacs", "research-archive", "web-viewer"] and s.peer("pacs").tls
    assert s.peer("pacs").storage_commitment and s.peer("web-viewer").kind == "dicomweb"
    assert s.peer("web-viewer").tls_ca_file == site / "tls" / "hospital-ca.pem"  # resolved like [security]'s
    assert (s.peer("web-viewer").host, s.peer("web-viewer").port) == ("viewer.example.org", 443)
    ortho = s.rules[1]
    assert not ortho.enabled and ortho.views == ((-45.0, 10.0), (45.0, 10.0), (90.0, 0.0))
    assert s.output.series_number == 905
    assert s.loop_prevention.skip_derived == "secondary"


def test_example_site_needs_its_tls_files(tmp_path: Path) -> None:
    shutil.copy(EXAMPLE, tmp_path / "site.toml")
    with pytest.raises(ConfigError, match=r"security\.tls_certificate: file not found: .*tls/node\.crt"):
        load_settings(tmp_path / "site.toml", env={})


BAD = [
    ("[node]\nport = 70000\n", r"node\.port: must be 1\.\.65535, got 70000"),
    ("[node]\nport = 0\n", r"node\.port: must be 1\.\.65535, got 0"),
    ('[node]\nport = "11112"\n', r"node\.port: must be an integer"),
    ('[node]\nae_title = "ABCDEFGHIJKLMNOPQ"\n', r"node\.ae_title: .*1\.\.16 characters.*got 17"),
    ('[node]\nae_title = "A\\\\B"\n', r"node\.ae_title: .*backslash"),
    ('[node]\nae_title = "    "\n', r"node\.ae_title: .*all spaces"),
    ('[node]\nae_title = "A\\tB"\n', r"node\.ae_title: .*control characters"),
    ("[node]\nprot = 1\n", r"node: unknown key 'prot'; did you mean 'port'\?"),
    ('[node]\nduplicate_policy = "overwrite"\n', r"node\.duplicate_policy: must be one of"),
    (
        '[node]\ndatabase_url = "mysql://u@h/db"\n',
        r"node\.database_url: must be a sqlite:// or postgresql://",
    ),
    ('[node]\ndatabase_url = "not a url"\n', r"node\.database_url: not a database URL"),
    ("[node]\ndimse_timeout_s = 0\n", r"node\.dimse_timeout_s: must be > 0"),
    ("[nodes]\nport = 1\n", r"top level: unknown key 'nodes'; did you mean 'node'\?"),
    (
        '[security]\nallowed_calling_ae_titles = ["OK", "WAY_TOO_LONG_AE_TITLE"]\n',
        r"allowed_calling_ae_titles\[1\]",
    ),
    ('[engine]\ndevice = "gpu"\n', r"engine\.device: must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    ('[engine]\ndtype = "int8"\n', r"engine\.dtype: must be one of"),
    ("[engine]\nguidance_scale = 0.5\n", r"engine\.guidance_scale: must be >= 1\.0, got 0\.5"),
    ("[engine]\nsteps = 0\n", r"engine\.steps: must be >= 1, got 0"),
    ("[engine]\nsteps = 2.5\n", r"engine\.steps: must be an integer, got 2\.5"),
    ("[engine]\nguidance_scale = \"high\"\n", r"engine\.guidance_scale: must be a number, got 'high'"),
    ('[engine]\nmax_batch = "many"\n', r'engine\.max_batch: must be an integer >= 1 or "auto", got \'many\''),
    ("[engine]\nmax_batch = 0\n", r"engine\.max_batch: must be >= 1, got 0"),
    ("[engine]\nmax_batch = true\n", r"engine\.max_batch: must be an integer >= 1 or \"auto\""),
    ('[engine]\ncompile = "yes"\n', r"engine\.compile: must be one of \('auto', 'on', 'off'\)"),
    ("[engine]\ncuda_graphs = 1\n", r"engine\.cuda_graphs: must be true or false"),
    (
        "[scheduler]\nbackoff_initial_s = 60\nbackoff_max_s = 30\n",
        r"scheduler\.backoff_max_s: must be >= 60\.0",
    ),
    ("[scheduler]\nworkers = true\n", r"scheduler\.workers: must be an integer, got True"),
    ("[output]\nseries_number = 42\n", r"output\.series_number: must be 900\.\.999, got 42"),
    ('[output]\nmodality = "ot"\n', r"output\.modality: must be a Code String"),
    ('[output]\nseries_description_prefix = ""\n', r"series_description_prefix: must be a non-empty string \(1\.\.24"),
    ('[output]\nseries_description_prefix = "SYNTHETIC VIEW SYNTH 2026 X"\n', r"at most 24 fit"),
    ('[output]\nseries_description_prefix = "SYNTHÈSE"\n', r"printable ASCII"),
    ("[loop_prevention]\nskip_synthetic = false\n", r"loop_prevention\.skip_synthetic: cannot be turned off"),
    (
        '[loop_prevention]\nskip_derived = "no"\n',
        r"loop_prevention\.skip_derived: must be one of 'secondary', 'all', 'none' .*got 'no'",
    ),
    ("[loop_prevention]\nskip_derived = 1\n", r"loop_prevention\.skip_derived: must be one of .*got 1"),
    ('[[peers]]\nname = "x"\nae_title = "X"\nhost = "h"\n', r"peers\[x\]\.port: required"),
    (
        '[[peers]]\nname = "x y"\nae_title = "X"\nhost = "h"\nport = 1\n',
        r"peers\[x y\]\.name: must be letters",
    ),
    (
        '[[peers]]\nname = "x"\nae_title = "A\\\\B"\nhost = "h"\nport = 1\n',
        r"peers\[x\]\.ae_title: .*backslash",
    ),
    ('[[peers]]\nname = "x"\nae_title = "X"\nhost = ""\nport = 1\n', r"peers\[x\]\.host: must be a host"),
    (
        '[[peers]]\nname = "x"\nae_title = "X"\nhost = "h"\nport = 1\nsecure = true\n',
        r"peers\[x\]: unknown key 'secure'",
    ),
    (
        '[[peers]]\nname = "pacs"\nae_title = "X"\nhost = "h"\nport = 1\n',
        r"peers\[pacs\]\.name: duplicate name",
    ),
    (
        '[[rules]]\nname = "r"\nazimuths = [30]\ndestinations = ["nowhere"]\n',
        r"rules\[r\]\.destinations: unknown peer 'nowhere'",
    ),
    (
        '[[rules]]\nname = "r"\nazimuths = [30, 60]\nelevations = [10]\n',
        r"rules\[r\]\.elevations: .*one value per azimuth \(2\), got 1",
    ),
    ('[[rules]]\nname = "chest"\nazimuths = [45]\n', r"rules\[chest\]\.name: duplicate name 'chest'"),
    (
        '[[rules]]\nname = "r"\nazimuth = [45]\n',
        r"rules\[r\]: unknown key 'azimuth'; did you mean 'azimuths'\?",
    ),
    ('[[rules]]\nname = "r"\n', r"rules\[r\]\.azimuths: required"),
    (
        '[[rules]]\nname = "r"\nazimuths = [120]\n',
        r"rules\[r\]\.azimuths: each angle must be in \[-90, 90\] degrees, got 120",
    ),
    ("[node\n", r"cannot read TOML"),
]


@pytest.mark.parametrize(("extra", "message"), BAD, ids=[m for _, m in BAD])
def test_invalid_values_name_their_key(tmp_path: Path, extra: str, message: str) -> None:
    # MINIMAL's [node] table must not be opened twice: put node keys in a file of their own.
    text = MINIMAL.replace('[node]\nstorage_dir = "data"\n', "") + "\n" + extra
    with pytest.raises(ConfigError, match=message):
        load_settings(write(tmp_path, text), env={})


def test_list_sections_must_be_arrays_of_tables(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"peers: must be an array of tables, written \[\[peers\]\]"):
        load_settings(write(tmp_path, '[peers]\nname = "pacs"\n'), env={})
    with pytest.raises(ConfigError, match=r"node: must be a table, written \[node\]"):
        load_settings(write(tmp_path, "node = 1\n"), env={})


def test_tls_key_without_certificate(tmp_path: Path) -> None:
    (tmp_path / "node.key").write_text("key")
    text = MINIMAL + '\n[security]\ntls_private_key = "node.key"\n'
    with pytest.raises(ConfigError, match=r"security\.tls_certificate: .*must be set together"):
        load_settings(write(tmp_path, text), env={})


def test_env_overrides_file_and_cli_overrides_env(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    assert load_settings(path, env={}).node.port == 11112
    env = {
        "DICOMNODE_NODE__PORT": "11113",
        "DICOMNODE_NODE__AE_TITLE": "1234",  # a string setting keeps the raw text
        "DICOMNODE_ENGINE__DEVICE": "cuda:1",
        "DICOMNODE_SECURITY__ALLOWED_CALLING_AE_TITLES": '["CR1", "DX2"]',
        "DICOMNODE_LOOP_PREVENTION__SKIP_DERIVED": "false",
        "DICOMNODE_SCHEDULER__SETTLE_S": "0.5",
        "DICOMNODE_CONFIG": "ignored when a path is given",
        "DICOMNODE_LOG": "not a setting (no __): ignored",
        "HOME": "/root",
    }
    s = load_settings(path, env=env)
    assert s.node.port == 11113 and s.node.ae_title == "1234" and s.engine.device == "cuda:1"
    assert s.security.allowed_calling_ae_titles == ("CR1", "DX2")
    assert s.loop_prevention.skip_derived == "none" and s.scheduler.settle_s == 0.5
    s = load_settings(path, env=env, overrides={"node.port": 11114, "engine.device": None})
    assert s.node.port == 11114 and s.engine.device == "cuda:1"


@pytest.mark.parametrize(
    ("value", "expected"),
    [('"secondary"', "secondary"), ('"all"', "all"), ('"none"', "none"), ("true", "all"), ("false", "none")],
)
def test_skip_derived_values_and_old_booleans(tmp_path: Path, value: str, expected: str) -> None:
    """The key was a boolean once: true (skip every DERIVED) is "all", false is "none"."""
    s = load_settings(write(tmp_path, MINIMAL + f"\n[loop_prevention]\nskip_derived = {value}\n"), env={})
    assert s.loop_prevention.skip_derived == expected


@pytest.mark.parametrize(("text", "expected"), [("all", "all"), ("true", "all"), ("secondary", "secondary")])
def test_skip_derived_from_environment(tmp_path: Path, text: str, expected: str) -> None:
    env = {"DICOMNODE_LOOP_PREVENTION__SKIP_DERIVED": text}
    assert load_settings(write(tmp_path, MINIMAL), env=env).loop_prevention.skip_derived == expected


def test_bad_skip_derived_names_key_and_source(tmp_path: Path) -> None:
    env = {"DICOMNODE_LOOP_PREVENTION__SKIP_DERIVED": "DERIVED"}
    with pytest.raises(
        ConfigError,
        match=r"loop_prevention\.skip_derived: must be one of 'secondary', 'all', 'none' "
        r"\(or true = 'all', false = 'none'\), got 'DERIVED' \(set by environment",
    ):
        load_settings(write(tmp_path, MINIMAL), env=env)


def test_bad_override_names_its_source(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    with pytest.raises(
        ConfigError,
        match=r"node\.port: must be 1\.\.65535, got 99999 \(set by environment DICOMNODE_NODE__PORT\)",
    ):
        load_settings(path, env={"DICOMNODE_NODE__PORT": "99999"})
    with pytest.raises(ConfigError, match=r"environment DICOMNODE_NODE__PROT: unknown key 'prot'"):
        load_settings(path, env={"DICOMNODE_NODE__PROT": "1"})
    with pytest.raises(ConfigError, match=r"environment DICOMNODE_NOD__PORT: unknown key 'nod'"):
        load_settings(path, env={"DICOMNODE_NOD__PORT": "1"})
    with pytest.raises(ConfigError, match=r"\[\[peers\]\] entries can only be set in the configuration file"):
        load_settings(path, env={"DICOMNODE_PEERS__NAME": "x"})
    with pytest.raises(ConfigError, match=r"override 'node.prot': unknown key 'prot'"):
        load_settings(path, env={}, overrides={"node.prot": 1})
    with pytest.raises(ConfigError, match=r"engine\.steps: must be >= 1, got 0 \(set by command line\)"):
        load_settings(path, env={}, overrides={"engine.steps": 0})


def test_relative_paths_resolve_against_config_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"
    (site / "tls").mkdir(parents=True)
    for name in ("node.crt", "node.key"):
        (site / "tls" / name).write_text("PEM placeholder\n")
    text = MINIMAL + '\n[engine]\nmodel = "../models/m"\n\n[security]\ntls_certificate = "tls/node.crt"\n'
    text += 'tls_private_key = "tls/node.key"\n'
    path = write(site, text)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    s = load_settings(path, env={})
    assert s.node.storage_dir == site / "data"
    assert s.engine.model == tmp_path / "models" / "m"
    assert (
        s.security.tls_certificate == site / "tls" / "node.crt"
        and s.security.tls_private_key == site / "tls" / "node.key"
    )
    # Paths from the environment and the command line resolve against the current directory.
    s = load_settings(path, env={"DICOMNODE_NODE__STORAGE_DIR": "spool"}, overrides={"engine.model": "w"})
    assert s.node.storage_dir == elsewhere / "spool" and s.engine.model == elsewhere / "w"


def test_omitted_paths_default_next_to_the_file(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, MINIMAL.replace('storage_dir = "data"', "port = 104")), env={})
    assert s.node.storage_dir == tmp_path / "var" and s.engine.model == REPO / "models" / "demo"  # the packaged one
    assert s.node.port == 104


def test_objects_built_in_code_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"node\.storage_dir: must be absolute"):
        NodeSettings(storage_dir=Path("relative"))
    node = NodeSettings(storage_dir=tmp_path, ae_title="  PADDED ", database_url="postgresql://u:secret@db/x")
    assert node.ae_title == "PADDED" and node.effective_database_url == "postgresql://u:secret@db/x"
    s = load_settings(write(tmp_path, MINIMAL), env={})
    with pytest.raises(ConfigError, match=r"rules\[chest\]\.destinations: unknown peer 'pacs' \(peers: none\)"):
        Settings(node=s.node, engine=s.engine, rules=s.rules)


def run_check(argv: list[str]) -> int:
    """Run ``config check`` through a bare parser holding only this module's command."""
    parser = argparse.ArgumentParser(prog="dicomnode")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_config_check_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = MINIMAL.replace(
        'storage_dir = "data"',
        'storage_dir = "data"\ndatabase_url = "postgresql://svdrr:s3cret@db:5432/node"',
    )
    assert run_check(["config", "check", "--config", str(write(tmp_path, text))]) == ExitCode.OK
    out = capsys.readouterr().out
    assert "s3cret" not in out and "postgresql://svdrr:***@db:5432/node" in out
    assert "AE SVDRR on 127.0.0.1:11112" in out and f"storage: {tmp_path / 'data'}" in out
    assert "pacs: ORTHANC at 127.0.0.1:4242" in out and "chest: 2 views [-30, 30] -> pacs" in out
    assert f"model: {REPO / 'models' / 'demo'} (found)" in out  # engine.model left out: the packaged demo
    # A model folder that exists without model_index.json is one still to come: synthesis waits for it.
    (tmp_path / "models" / "next").mkdir(parents=True)
    write(tmp_path, text + '\n[engine]\nmodel = "models/next"\n')
    assert run_check(["config", "check", "-c", str(tmp_path / "site.toml")]) == ExitCode.OK
    assert f"model: {tmp_path / 'models' / 'next'} (no model_index.json yet)" in capsys.readouterr().out


def test_config_check_reports_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, MINIMAL + "\n[engine]\nsteps = -1\n")
    assert run_check(["config", "check", "--config", str(path)]) == ExitCode.CONFIG
    err = capsys.readouterr().err
    assert "engine.steps: must be >= 1, got -1" in err and str(path) in err
    assert run_check(["config"]) == ExitCode.USAGE


def test_add_config_argument() -> None:
    parser = argparse.ArgumentParser()
    add_config_argument(parser)
    assert parser.parse_args([]).config is None
    assert parser.parse_args(["-c", "x.toml"]).config == Path("x.toml")


def test_main_runs_config_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Until "config" is in COMMAND_MODULES, register it alone for this test (registration is proven above).
    if "config" not in cli.COMMAND_MODULES:
        monkeypatch.setattr(cli, "COMMAND_MODULES", ("config",))
    assert cli.main(["config", "check", "--config", str(SHIPPED)]) == ExitCode.OK
    assert "chest-radiograph: 6 views" in capsys.readouterr().out
    bad = write(tmp_path, MINIMAL.replace('storage_dir = "data"', "port = 70000"))
    assert cli.main(["config", "check", "--config", str(bad)]) == ExitCode.CONFIG
    assert "node.port: must be 1..65535, got 70000" in capsys.readouterr().err


def test_engine_fast_path_keys(tmp_path: Path) -> None:
    """``max_batch`` takes an integer or "auto" (file and environment); the fast path switches."""
    shipped = load_settings(SHIPPED, env={}).engine
    assert (shipped.compile, shipped.cuda_graphs, shipped.pad_batches, shipped.warm_up) == ("auto", True, True, True)
    path = write(tmp_path, MINIMAL + '\n[engine]\nmax_batch = "auto"\ncompile = "off"\nwarm_up = false\n')
    s = load_settings(path, env={})
    assert s.engine.max_batch == "auto" and s.engine.compile == "off" and s.engine.warm_up is False
    s = load_settings(path, env={"DICOMNODE_ENGINE__MAX_BATCH": "16", "DICOMNODE_ENGINE__PAD_BATCHES": "false"})
    assert s.engine.max_batch == 16 and s.engine.pad_batches is False
    assert load_settings(SHIPPED, env={"DICOMNODE_ENGINE__MAX_BATCH": "auto"}).engine.max_batch == "auto"
