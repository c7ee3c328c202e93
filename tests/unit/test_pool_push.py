"""The push to the DVC remote without a remote: its settings, DVC's output, the owed-push marker."""

from __future__ import annotations

import json

import pytest

from detloop.core.config import compose
from detloop.core.errors import BadInput
from detloop.data import remote
from detloop.data.remote import DataChange, PushResult, PushSettings, Remote

TEAM = Remote("team", "s3://bucket/dvc")
DVC_REFUSED = (
    "ERROR: unexpected error - Could not connect to the endpoint URL: "
    '"http://127.0.0.1:9/bucket/dvc/files/md5/ab/cd.dir"\n\n'
    "Having any troubles? Hit us up at https://dvc.org/support, we are always happy to help!\n"
)


@pytest.fixture
def settings(tmp_path) -> PushSettings:
    return PushSettings("auto", 60.0, None, tmp_path / "state")


def test_the_default_settings_push_automatically_with_a_time_limit():
    s = remote.push_settings(compose([]))
    assert (s.mode, s.timeout, s.jobs) == ("auto", 900.0, None)
    assert s.state_dir.as_posix().endswith(".dvc/tmp/detloop")


def test_bad_push_settings_are_bad_input_naming_each_key():
    cfg = compose(["pool.push.mode=sometimes", "pool.push.timeout=0", "pool.push.jobs=many"])
    with pytest.raises(BadInput) as info:
        remote.push_settings(cfg)
    text = info.value.render()
    for key in ("pool.push.mode='sometimes'", "pool.push.timeout=0", "pool.push.jobs='many'"):
        assert key in text


def test_dvc_output_gives_the_objects_pushed_and_the_reason_of_a_failure():
    assert remote.pushed_count("5 files pushed\n") == 5
    assert remote.pushed_count("1 file pushed\n") == 1
    assert remote.pushed_count("Everything is up to date.\n") == 0
    reason = remote.dvc_error(DVC_REFUSED, 255)
    assert reason.startswith("Could not connect to the endpoint URL") and "Having any troubles" not in reason
    assert remote.dvc_error("", 1) == "dvc push exited with 1"


def test_credentials_in_a_remote_url_are_never_shown():
    assert remote.safe_url("https://user:secret@host.example/dvc") == "https://host.example/dvc"
    assert remote.safe_url("s3://bucket/dvc") == "s3://bucket/dvc"


def test_owed_versions_stay_in_the_marker_until_delivered(settings):
    # given two versions owed (the second recorded while the first was still owed)
    remote.owe(settings, TEAM, "aaa.dir", "review accept")
    remote.owe(settings, TEAM, "bbb.dir", "review reject")
    remote.owe(settings, TEAM, "bbb.dir", "retry")  # once only
    assert remote.owed_versions(settings) == ["aaa.dir", "bbb.dir"]
    # when a push fails, the reason is recorded and both stay owed
    assert remote.settled(settings, TEAM, [], {"bbb.dir": "refused"}) == ["aaa.dir", "bbb.dir"]
    pending = remote.read_pending(settings)
    assert pending["last_error"] == "refused" and pending["attempts"] == 1 and pending["remote"] == "team"
    # when one is delivered, only the other stays; when both are, the marker goes
    assert remote.settled(settings, TEAM, ["bbb.dir"], {}) == ["aaa.dir"]
    assert remote.settled(settings, TEAM, ["aaa.dir"], {}) == []
    assert remote.read_pending(settings) is None


def test_an_unreadable_marker_still_counts_as_owed(settings):
    settings.state_dir.mkdir(parents=True)
    (settings.state_dir / remote.PENDING_FILE).write_text("{not json")
    assert remote.read_pending(settings)["versions"] == []
    remote.owe(settings, TEAM, "ccc.dir", "retry")
    assert json.loads((settings.state_dir / remote.PENDING_FILE).read_text())["versions"][0]["version"] == "ccc.dir"


def test_a_failed_push_of_the_commands_own_change_exits_4():
    failed = PushResult("review accept", {"name": "team", "url": "s3://b/dvc"}, "x.dir", ok=False, error="refused")
    pushed = PushResult("review accept", {"name": "team", "url": "s3://b/dvc"}, "x.dir", ok=True, uploaded=3)
    assert DataChange("review accept", push=failed).exit_code() == remote.PUSH_FAILED_EXIT
    assert DataChange("review accept", push=pushed).exit_code() == 0
    assert DataChange("inbox add", retry=failed).exit_code(2) == 2  # a failed retry does not change the code
    assert "NOT pushed: data version x.dir to DVC remote 'team' (s3://b/dvc): refused" in failed.summary()
    assert "3 new object(s) uploaded" in pushed.summary()


def test_data_outside_the_project_is_never_pushed(tiny_project):
    # given data that DVC does not track in the project (the tests' temporary data)
    cfg = compose([*tiny_project, "pool.push.mode=always"])
    # then a command that would push needs a tracked folder: refused before anything runs
    with pytest.raises(BadInput, match="needs the data folder tracked"), remote.data_change(cfg, "review accept"):
        pytest.fail("the command ran")
    # and with auto nothing is pushed, nothing retried
    with remote.data_change(compose(tiny_project), "review accept") as change:
        pass
    assert change.retry is None and change.push is None and change.exit_code() == 0
    status = remote.remote_status(compose(tiny_project))
    assert not status["tracked"] and "not tracked by DVC" in remote.format_remote_status(status)[0]
