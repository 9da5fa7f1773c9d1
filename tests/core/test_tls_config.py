"""TLS settings: what the reader accepts and refuses (naming the key and the file), the
checks of certificate and key files, and the redirect target of a plain listener."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from test_config import document, problems, write
from tlscerts import Authority

from supervisor.config import tls as tls_config
from supervisor.config.reader import load
from supervisor.http.redirect import https_location, split_host


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    ca = Authority(directory)
    good = ca.issue("a.test", ["a.test"])
    other = ca.issue("b.test", ["b.test"])
    garbage = directory / "garbage.pem"
    garbage.write_text("hello\n")
    encrypted = directory / "encrypted.key"
    import subprocess
    subprocess.run(["openssl", "pkey", "-in", str(good[1]), "-out", str(encrypted), "-aes256",
                    "-passout", "pass:secret"], check=True, capture_output=True)
    return SimpleNamespace(ca=ca, cert=good[0], key=good[1], other_key=other[1], garbage=garbage,
                           encrypted=encrypted, missing=directory / "missing.pem")


def test_an_app_on_a_tls_listener_loads_with_its_files(tmp_path, pki):
    path = write(tmp_path, document(listener="tls = true", app=f"""
certificate = "{pki.cert}"
private_key = "{pki.key}"
client_ca = "{pki.ca.cert}"
tls_min_version = "1.3"
"""))
    config = load(path)
    assert config.listeners["web"].tls is True
    app = config.apps["blog"]
    assert (app.certificate, app.private_key, app.client_ca, app.tls_min_version) == (
        str(pki.cert), str(pki.key), str(pki.ca.cert), "1.3")


@pytest.mark.parametrize("listener, app, expected", [
    ("tls = true", "", "apps.blog.certificate: expected a PEM certificate file (the certificate, then its "
                       "chain): listener 'web' has tls = true"),
    ("tls = true", 'certificate = "{cert}"', "apps.blog.private_key: expected a PEM private key file: "
                                             "listener 'web' has tls = true"),
    ("", 'certificate = "{cert}"\nprivate_key = "{key}"',
     "apps.blog.certificate: applies to an app on a listener with tls = true; none of its listeners is"),
    ("", 'tls_min_version = "1.3"', "apps.blog.tls_min_version: applies to an app on a listener with tls = true"),
    ("tls = true", 'certificate = "{cert}"\nprivate_key = "{key}"\ntls_min_version = "1.1"',
     "apps.blog.tls_min_version: expected one of '1.2' or '1.3'"),
    ("tls = 1", "", "listeners.web.tls: expected true or false"),
    ("tls = true\nredirect_https = true", 'certificate = "{cert}"\nprivate_key = "{key}"',
     "listeners.web.redirect_https: applies to a plain listener, found one with tls = true"),
    ("redirect_https = 70000", "", "listeners.web.redirect_https: expected true, false or a port number from 1 "
                                   "to 65535, found integer 70000"),
    ("tls = true", 'certificate = "{cert}"\nprivate_key = "{other_key}"',
     "apps.blog.private_key: the private key in {other_key} does not match the certificate in {cert}"),
    ("tls = true", 'certificate = "{cert}"\nprivate_key = "{garbage}"',
     "apps.blog.private_key: expected a PEM private key in {garbage}: "),
    ("tls = true", 'certificate = "{cert}"\nprivate_key = "{encrypted}"',
     "apps.blog.private_key: expected an unencrypted PEM private key, found an encrypted one in {encrypted}"),
    ("tls = true", 'certificate = "{garbage}"\nprivate_key = "{key}"',
     "apps.blog.certificate: expected PEM certificates in {garbage}: "),
    ("tls = true", 'certificate = "{missing}"\nprivate_key = "{key}"',
     "apps.blog.certificate: cannot read {missing}: No such file or directory"),
    ("tls = true", 'certificate = "{cert}"\nprivate_key = "{key}"\nclient_ca = "{garbage}"',
     "apps.blog.client_ca: expected PEM CA certificates in {garbage}: "),
])
def test_tls_problems_name_the_key_the_file_and_what_was_expected(tmp_path, pki, listener, app, expected):
    names = vars(pki) | {"cert": pki.cert, "key": pki.key}
    path, found = problems(tmp_path, document(listener=listener, app=app.format(**names)))
    expected = expected.format(**names)
    assert any(line.startswith(f"{path}: {expected}") for line in found), found


def test_two_apps_on_a_share_listener_are_refused_tls_or_not(tmp_path, pki):
    text = document(listener='mode = "share"\ntls = true', app=f'certificate = "{pki.cert}"\nprivate_key = '
                    f'"{pki.key}"', extra=f"""
[apps.shop]
module = "shop:app"
listeners = ["web"]
certificate = "{pki.cert}"
private_key = "{pki.key}"
""")
    path, found = problems(tmp_path, text)
    assert any("apps blog, shop share this listener: expected mode 'balance'" in line for line in found), found


@pytest.mark.parametrize("value, port", [(True, 443), (False, None), (8443, 8443), (1, 1), (65535, 65535)])
def test_redirect_https_is_true_false_or_a_port(value, port):
    assert tls_config.redirect_port(value) == port


@pytest.mark.parametrize("value", [0, 65536, "yes", 1.5, -1])
def test_redirect_https_refuses_anything_else(value):
    with pytest.raises(ValueError):
        tls_config.redirect_port(value)


@pytest.mark.parametrize("host, target, port, expected", [
    ("a.test", "/", 443, "https://a.test/"),
    ("a.test:8080", "/x?y=1", 443, "https://a.test/x?y=1"),
    ("a.test:8080", "/x", 8443, "https://a.test:8443/x"),
    ("[::1]:8080", "/x", 8443, "https://[::1]:8443/x"),
    ("[::1]", "/", 443, "https://[::1]/"),
    ("10.0.0.1:80", "/p", 443, "https://10.0.0.1/p"),
    (None, "/p", 443, "https://server.example/p"),
    ("", "/p", 444, "https://server.example:444/p"),
    ("a.test", "*", 443, "https://a.test/"),
    ("a.test", "http://other.test/abs?q", 443, "https://a.test/abs?q"),
    (None, "http://other.test:81/abs", 443, "https://other.test/abs"),
    (None, "http://other.test", 443, "https://other.test/"),
])
def test_https_location_keeps_host_and_target(host, target, port, expected):
    assert https_location(host, target, port, "server.example") == expected


def test_a_bare_ipv6_server_name_is_bracketed():
    assert https_location(None, "/", 8443, "::1") == "https://[::1]:8443/"
    assert split_host("[::1]:80") == "[::1]" and split_host("a:1") == "a" and split_host("a") == "a"


@pytest.mark.parametrize("app, listener_tls, expected", [
    (dict(certificate="c", private_key="k"), True, []),
    (dict(certificate="c", private_key=None), True, ["private_key"]),
    (dict(certificate=None, private_key=None), True, ["certificate", "private_key"]),
    (dict(certificate=None, private_key=None), False, []),
    (dict(certificate="c", private_key="k", client_ca="ca"), False, ["certificate", "private_key", "client_ca"]),
    (dict(tls_min_version="1.3"), False, ["tls_min_version"]),
])
def test_consistency_of_an_apps_tls_keys(app, listener_tls, expected):
    fields = dict(certificate=None, private_key=None, client_ca=None, tls_min_version="1.2") | app
    listener = SimpleNamespace(name="web", tls=listener_tls)
    assert [key for key, _ in tls_config.consistency(SimpleNamespace(**fields), [listener])] == expected


def test_tls_files_are_what_rotation_watches(pki):
    app = SimpleNamespace(certificate="/c", private_key="/k", client_ca=None)
    assert tls_config.tls_files(app) == ("/c", "/k")


def test_baton_serve_takes_gunicorns_certfile_keyfile_and_ca_certs(tmp_path, pki):
    from supervisor import cli
    config = cli.serve_config(["tests.apps.probe", "--certfile", str(pki.cert), "--keyfile", str(pki.key),
                               "--ca-certs", str(pki.ca.cert), "--control-socket", str(tmp_path / "s.ctl")],
                              {}, str(tmp_path))
    assert [listener.tls for listener in config.listeners.values()] == [True]
    app = config.apps["app"]
    assert (app.certificate, app.private_key, app.client_ca) == (str(pki.cert), str(pki.key), str(pki.ca.cert))


def test_baton_serve_names_the_flag_of_a_missing_key_file(tmp_path, pki, capsys):
    from supervisor import cli
    assert cli.main(["serve", "tests.apps.probe", "--certfile", str(pki.cert)]) == 1   # a config error
    assert "baton serve: --keyfile: expected a PEM private key file" in capsys.readouterr().err


@pytest.mark.parametrize("change", [dict(tls=True), dict(redirect_https=443)])
def test_turning_tls_or_the_redirect_on_restarts_the_listeners_apps(change):
    from dataclasses import replace
    from types import MappingProxyType

    from supervisor.config.binds import parse_bind
    from supervisor.config.model import AppConfig, Config, ListenerConfig, MasterConfig
    from supervisor.config.plan import diff
    web = ListenerConfig("web", parse_bind("127.0.0.1:8000", "/"))
    app = AppConfig("blog", "blog:app", ("web",))

    def config(listener):
        return Config(None, MasterConfig(), MappingProxyType({"web": listener}), MappingProxyType({"blog": app}))
    plan = diff(config(web), config(replace(web, **change)))
    assert plan.apps_restart == ("blog",) and plan.listeners_keep == ("web",)
    assert plan.reasons["app blog"] == ("listener:web",)
