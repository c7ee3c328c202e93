"""Where ``detloop review annotate|commit`` finds Label Studio, and the errors when it cannot (no server here:
the server itself is driven in tests/integration/test_labelstudio.py)."""

from __future__ import annotations

import pytest
from tests.conftest import tiny_overrides

from detloop.cli.main import main as cli
from detloop.core.config import compose
from detloop.core.env import free_port
from detloop.core.errors import BadInput
from detloop.fiftyone import labelstudio


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(labelstudio.ENV_URL, raising=False)
    monkeypatch.delenv(labelstudio.ENV_KEY, raising=False)


def test_the_environment_names_a_team_server_and_wins(tmp_path, no_env, monkeypatch):
    # given both variables set (a team's Label Studio)
    monkeypatch.setenv(labelstudio.ENV_URL, "http://ls.example.org:8080/")
    monkeypatch.setenv(labelstudio.ENV_KEY, "abc")
    # when a command looks for the server
    found = labelstudio.credentials(compose(tiny_overrides(tmp_path)))
    # then it takes them (never the config files), and says where they came from
    assert (found.url, found.api_key, found.local) == ("http://ls.example.org:8080", "abc", False)
    assert labelstudio.ENV_KEY in found.source and found.kwargs() == {"url": found.url, "api_key": "abc"}


def test_half_an_environment_is_refused(tmp_path, no_env, monkeypatch):
    monkeypatch.setenv(labelstudio.ENV_URL, "http://127.0.0.1:8080")
    with pytest.raises(BadInput, match=f"{labelstudio.ENV_URL} and {labelstudio.ENV_KEY}: set both"):
        labelstudio.credentials(compose(tiny_overrides(tmp_path)))


def test_without_a_server_the_error_says_how_to_start_one(tmp_path, no_env):
    with pytest.raises(BadInput) as err:
        labelstudio.credentials(compose(tiny_overrides(tmp_path)))
    assert "has not been started" in err.value.summary and "nothing was changed" in err.value.summary
    assert any("detloop annotation up" in p for p in err.value.problems)


def test_a_server_that_does_not_answer_is_bad_input(tmp_path, no_env):
    closed = labelstudio.Credentials(f"http://127.0.0.1:{free_port()}", "k", "test", local=False)
    with pytest.raises(BadInput, match="does not answer .*Connection refused.*nothing was changed"):
        labelstudio.check(closed, timeout=2)


def test_annotate_without_a_server_exits_2_before_anything_is_sent(tmp_path, no_env, capsys):
    # given no Label Studio running for this build folder
    code = cli(["review", "annotate", *tiny_overrides(tmp_path)])
    # then the command refuses with what to do, and never started FiftyOne's database
    assert code == 2
    assert "detloop annotation up" in capsys.readouterr().err
    assert not (tmp_path / "build" / "fiftyone").exists()


def test_annotation_status_of_a_server_never_started_exits_1(tmp_path, capsys):
    assert cli(["annotation", "status", *tiny_overrides(tmp_path)]) == 1
    assert "not running" in capsys.readouterr().out
