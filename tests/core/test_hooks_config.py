"""Lifecycle hooks in the config: every key takes "pkg.mod:function", judged when the
config is read by the rule the worker imports it by; and the request hooks' wrapper
around an app (supervisor.worker.hooks), fed environs, without a server."""
from __future__ import annotations

import logging

import pytest
from test_modulespec import INVALID, VALID

from supervisor.config.model import ConfigError
from supervisor.config.modulespec import HOOKS, parse_hook
from supervisor.config.reader import from_mapping
from supervisor.worker import appload
from supervisor.worker.hooks import Hooks

# A hook is called by the worker, never named by a call: the factory forms are refused.
HOOK_VALID = [(text, spec) for text, spec in VALID if not spec.call]
HOOK_INVALID = INVALID + [text for text, spec in VALID if spec.call]


def _read(app_keys: dict):
    data = {"listeners": {"web": {"bind": "127.0.0.1:8000"}},
            "apps": {"blog": {"module": "blog:app", "listeners": ["web"], **app_keys}}}
    return from_mapping(data, None, running_as_root=False, base_dir="/")


@pytest.mark.parametrize("text, expected", HOOK_VALID + [(text, None) for text in HOOK_INVALID])
def test_parse_hook(text, expected):
    if expected is None:
        pytest.raises(ValueError, parse_hook, text)
    else:
        assert parse_hook(text) == expected


@pytest.mark.parametrize("key", HOOKS)
@pytest.mark.parametrize("text", [text for text, _ in HOOK_VALID] + HOOK_INVALID)
def test_the_config_and_the_loader_accept_the_same_hook_specs(key, text):
    try:
        config = _read({key: text})
    except ConfigError as exc:
        what = "a non-empty string, found an empty string" if text == "" else (
            f"'pkg.mod:function', found string {text!r}")
        assert exc.problems == [f"<command line>: apps.blog.{key}: expected {what}"]
        assert text in HOOK_INVALID
        with pytest.raises(appload.AppLoadError, match="is not MODULE:FUNCTION"):
            appload.load_hook(text)
        return
    assert text in dict(HOOK_VALID)
    assert getattr(config.apps["blog"], key) == text


@pytest.mark.parametrize("value, found", [(1, "integer 1"), (["a:b"], "array"), (True, "boolean true")])
def test_a_hook_that_is_no_string_names_its_key(value, found):
    with pytest.raises(ConfigError) as caught:
        _read({"pre_request": value})
    (problem,) = caught.value.problems
    assert problem.startswith("<command line>: apps.blog.pre_request: expected a non-empty string")
    assert found in problem


def test_no_hook_is_set_by_default():
    app = _read({}).apps["blog"]
    assert [getattr(app, key) for key in HOOKS] == [None] * len(HOOKS)


# -- the wrapper -----------------------------------------------------------------------

class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def _hooks(calls, pre_fails=False, post_fails=False):
    def pre(environ):
        calls.append(("pre", environ["PATH_INFO"]))
        if pre_fails:
            raise RuntimeError("pre")

    def post(environ, status, duration_s):
        calls.append(("post", environ["PATH_INFO"], status, duration_s))
        if post_fails:
            raise RuntimeError("post")
    return Hooks({"pre_request": pre, "post_request": post})


def _call(app, path="/"):
    seen = []
    result = app({"PATH_INFO": path, "REQUEST_METHOD": "GET", "RAW_URI": path},
                 lambda status, headers, exc_info=None: seen.append(status))
    return seen, result


@pytest.mark.parametrize("kind", ["list", "generator"])
@pytest.mark.parametrize("post_fails", [False, True])
def test_post_request_follows_the_end_of_the_response(kind, post_fails):
    calls, clock = [], _Clock()

    def app(environ, start_response):
        calls.append(("app",))
        start_response("201 Created", [])
        clock.now += 0.25
        return [b"x"] if kind == "list" else (c for c in [b"x"])
    wrapped = _hooks(calls, post_fails=post_fails).wrap(app, logging.getLogger("test"), clock)
    seen, result = _call(wrapped)
    assert seen == ["201 Created"]
    if kind == "generator":
        assert calls == [("pre", "/"), ("app",)]     # not before the server closes it
        assert list(result) == [b"x"]
        result.close()
        result.close()                               # once only
    assert calls == [("pre", "/"), ("app",), ("post", "/", "201 Created", 0.25)]


def test_a_raising_pre_request_answers_500_without_calling_the_app():
    calls = []
    wrapped = _hooks(calls, pre_fails=True).wrap(lambda e, s: calls.append("app"), logging.getLogger("test"))
    seen, result = _call(wrapped, "/x")
    assert seen == ["500 Internal Server Error"] and result == [b"Internal Server Error\n"]
    assert calls == [("pre", "/x")]


def test_an_app_that_raises_still_gets_post_request_with_no_status():
    calls = []

    def app(environ, start_response):
        raise ValueError("app")
    wrapped = _hooks(calls).wrap(app, logging.getLogger("test"), _Clock())
    with pytest.raises(ValueError):
        _call(wrapped)
    assert calls == [("pre", "/"), ("post", "/", None, 0.0)]


def test_without_request_hooks_the_app_is_not_wrapped():
    def app(environ, start_response):
        return []
    assert Hooks({}).wrap(app, logging.getLogger("test")) is app


def test_hooks_load_names_the_key_of_a_missing_function():
    class App:
        post_fork = "tests.apps.lifecycle:nope"
    with pytest.raises(appload.AppLoadError, match="post_fork: module 'tests.apps.lifecycle' has no attribute 'nope'"):
        Hooks.load(App)
