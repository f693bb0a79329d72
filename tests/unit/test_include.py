"""`include:` in policy files, and the shipped presets under policies/presets/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy.hosts import canonicalize_host
from proxy.policy.load import MAX_INCLUDE_DEPTH, PolicyErrors, load_policies
from proxy.policy.model import DefaultAction
from proxy.policy.requirements import load_requirements

REPO = Path(__file__).resolve().parents[2]
PRESETS = sorted((REPO / "policies" / "presets").glob("*.yaml"))


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _source(policy_file: Path, host: str, port: int = 443) -> str | None:
    rule = load_policies([policy_file]).allow.match(canonicalize_host(host), port)
    return None if rule is None else rule.source


def test_include_is_relative_to_the_including_file(tmp_path: Path) -> None:
    _write(tmp_path / "shared" / "presets" / "tools.yaml", "version: 1\nallow:\n  - tools.test\n")
    main = _write(
        tmp_path / "shared" / "main.yaml",
        "version: 1\ninclude: [presets/tools.yaml]\nallow: [own.test]\n",
    )
    preset = (tmp_path / "shared" / "presets" / "tools.yaml").resolve()
    assert _source(main, "tools.test") == f"{preset}:3"  # the preset's own file:line
    assert _source(main, "own.test") == f"{main}:3"


def test_including_file_settings_win_over_the_preset(tmp_path: Path) -> None:
    _write(tmp_path / "p.yaml", "version: 1\ndefault: allow\nallow: [p.test]\n")
    main = _write(tmp_path / "main.yaml", "version: 1\ndefault: deny\ninclude: [p.yaml]\n")
    assert load_policies([main]).default is DefaultAction.DENY


def test_missing_include_is_an_error_at_its_line(tmp_path: Path) -> None:
    main = _write(
        tmp_path / "main.yaml",
        "version: 1\nallow: [a.test]\ninclude:\n  - presets/ok.yaml\n  - presets/gone.yaml\n",
    )
    _write(tmp_path / "presets" / "ok.yaml", "version: 1\n")
    with pytest.raises(PolicyErrors) as caught:
        load_policies([main])
    (error,) = caught.value.errors
    assert (error.file, error.line) == (str(main), 5)
    assert "presets/gone.yaml" in error.message


def test_include_cycle_is_refused(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.yaml", "version: 1\ninclude: [b.yaml]\n")
    _write(tmp_path / "b.yaml", "version: 1\nallow: [b.test]\ninclude: [a.yaml]\n")
    with pytest.raises(PolicyErrors) as caught:
        load_policies([a])
    (error,) = caught.value.errors
    assert error.file == str((tmp_path / "b.yaml").resolve())
    assert error.line == 3
    assert "cycle" in error.message and "a.yaml -> b.yaml -> a.yaml" in error.message


def test_self_include_is_a_cycle(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.yaml", "version: 1\ninclude: [./a.yaml]\n")
    with pytest.raises(PolicyErrors, match="cycle"):
        load_policies([a])


def test_include_depth_is_bounded(tmp_path: Path) -> None:
    depth = MAX_INCLUDE_DEPTH + 2
    for i in range(depth):
        _write(tmp_path / f"f{i}.yaml", f"version: 1\ninclude: [f{i + 1}.yaml]\n")
    _write(tmp_path / f"f{depth}.yaml", "version: 1\n")
    with pytest.raises(PolicyErrors, match="deeper than"):
        load_policies([tmp_path / "f0.yaml"])


def test_diamond_include_loads_each_file_once(tmp_path: Path) -> None:
    _write(tmp_path / "common.yaml", "version: 1\nallow: [common.test]\n")
    _write(tmp_path / "x.yaml", "version: 1\ninclude: [common.yaml]\n")
    _write(tmp_path / "y.yaml", "version: 1\ninclude: [common.yaml]\n")
    main = _write(tmp_path / "main.yaml", "version: 1\ninclude: [x.yaml, y.yaml]\n")
    policy = load_policies([main])
    assert len([f for f in policy.files if f.endswith("common.yaml")]) == 1


def test_error_inside_an_included_file_names_that_file(tmp_path: Path) -> None:
    bad = _write(tmp_path / "bad.yaml", "version: 1\nallow:\n  - ok.test\n  - 'bad host!'\n")
    main = _write(tmp_path / "main.yaml", "version: 1\ninclude: [bad.yaml]\n")
    with pytest.raises(PolicyErrors) as caught:
        load_policies([main])
    (error,) = caught.value.errors
    assert (error.file, error.line) == (str(bad.resolve()), 4)


def test_requirements_file_refuses_include(tmp_path: Path) -> None:
    _write(tmp_path / "p.yaml", "version: 1\n")
    req = _write(tmp_path / "req.yaml", "version: 1\ninclude: [p.yaml]\n")
    with pytest.raises(PolicyErrors, match="requirements"):
        load_requirements(req)


def test_presets_ship() -> None:
    names = {p.name for p in PRESETS}
    assert {"package-registries.yaml", "source-hosting.yaml", "docs.yaml"} <= names


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_every_preset_validates(preset: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "policy", "validate", str(preset)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_presets_set_rules_only() -> None:
    """An include must not change the includer's default, mode or ports behind its back."""
    for preset in PRESETS:
        text = preset.read_text()
        for key in ("default:", "mode:", "network:", "approval:"):
            assert f"\n{key}" not in text, (preset.name, key)


def test_placeholders_are_marked_and_match_nothing_real() -> None:
    text = (REPO / "policies" / "presets" / "package-registries.yaml").read_text()
    placeholders = [line for line in text.splitlines() if "REPLACE-WITH-" in line]
    assert len(placeholders) >= 6  # Python index + files, npm, Debian x2, Ubuntu (and the note)
    assert all(".example" in line for line in placeholders if line.strip().startswith("-"))


def test_preset_included_from_a_policy_keeps_preset_sources(tmp_path: Path) -> None:
    preset = REPO / "policies" / "presets" / "source-hosting.yaml"
    main = _write(tmp_path / "main.yaml", f"version: 1\ninclude: ['{preset}']\n")
    source = _source(main, "github.com")
    assert source is not None and source.startswith(f"{preset.resolve()}:")
