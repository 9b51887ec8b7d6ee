"""Real web servers as backends behind the gate: nginx and Apache httpd, each on free loopback ports.

The gate is only as strict as the servers behind it read requests: a request the gate decides on
one name but a backend routes to another is a bypass. These backends make that visible: every
virtual host answers with a body naming itself (`server=<name>`), the Host it saw and (nginx TLS)
the SNI, and a default server (`server=default`) catches what matches no name. Everything they
write (config, pid, logs, temp files, certificates) stays in the test's tmp_path; they run in the
foreground as children of the test and `stop()` ends them.
"""

from __future__ import annotations

import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import trustme
from gatekit import free_port, wait_for_port

NGINX = "/usr/sbin/nginx"
APACHE = "/usr/sbin/apache2"
APACHE_MODULES = Path("/usr/lib/apache2/modules")


@dataclass
class Backend:
    """A running backend: its plain HTTP and TLS ports, the CA its certificates chain to, its logs."""

    kind: str
    http: int
    tls: int
    process: subprocess.Popen
    directory: Path
    error_log: Path
    access_log: Path
    ca_pem: Path

    def log(self) -> str:
        """The error log and what the process printed, for assertion messages."""
        paths = (self.error_log, self.directory / "stderr.log")
        return "\n".join(path.read_text(errors="replace") for path in paths if path.exists())

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


def issue_certs(directory: Path, names: list[str], ca: trustme.CA) -> dict[str, tuple[Path, Path]]:
    """One certificate per name (and one for the default server): name -> (chain pem, key pem)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in [*names, "default.invalid"]:
        cert = ca.issue_cert(name)
        chain, key = directory / ("%s.pem" % name), directory / ("%s.key" % name)
        for blob in cert.cert_chain_pems:
            blob.write_to_path(chain, append=chain.exists())
        cert.private_key_pem.write_to_path(key)
        paths[name] = (chain, key)
    return paths


def _launch(kind: str, directory: Path, argv: list[str], ports: dict[str, int], logs: tuple[Path, Path], ca_pem: Path):
    stderr = (directory / "stderr.log").open("w")
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr)
    backend = Backend(kind, ports["http"], ports["tls"], process, directory, logs[0], logs[1], ca_pem)
    try:
        for port in ports.values():
            if process.poll() is not None:
                raise RuntimeError("exited with %s" % process.returncode)
            wait_for_port(port, timeout=20, process=None)
    except (TimeoutError, RuntimeError) as error:
        backend.stop()
        raise RuntimeError("%s did not start (%s):\n%s" % (kind, error, backend.log())) from None
    return backend


# --- nginx ----------------------------------------------------------------------------------------
def _nginx_server(name: str, ports: dict[str, int], cert: tuple[Path, Path], files: Path, default: bool) -> str:
    label = "default" if default else name
    flag = " default_server" if default else ""
    return """
    server {
        listen 127.0.0.1:%(http)d%(flag)s;
        listen 127.0.0.1:%(tls)d ssl%(flag)s;
        server_name %(server_name)s;
        ssl_certificate %(chain)s;
        ssl_certificate_key %(key)s;
        add_header X-Served-By "%(label)s" always;
        location /files/ {
            alias %(files)s/;
        }
        location /chunked/ {
            sub_filter_types *;
            sub_filter "served" "served";
            return 200 "served host=$host sni=$ssl_server_name server=%(label)s uri=$request_uri\\n";
        }
        location / {
            return 200 "served host=$host sni=$ssl_server_name server=%(label)s\\n";
        }
    }
""" % {
        "http": ports["http"],
        "tls": ports["tls"],
        "flag": flag,
        "server_name": "_" if default else name,
        "chain": cert[0],
        "key": cert[1],
        "label": label,
        "files": files,
    }


def start_nginx(tmp_path: Path, names: list[str], certs: trustme.CA, files: dict[str, bytes] | None = None) -> Backend:
    """nginx with one server per name on a plain and a TLS port (its own certificate from `certs`)
    plus a default server on both. `/` is a `return`, so nginx answers without reading a request
    body, as for static files; `/chunked/` answers the same with a chunked body (a sub_filter
    drops the length); `/files/<name>` serves `files` as static files. Every answer carries
    `X-Served-By: <server name>` (`default` for the default server)."""
    directory = tmp_path / "nginx"
    directory.mkdir(parents=True, exist_ok=True)
    for temp in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi", "files"):
        (directory / temp).mkdir(exist_ok=True)
    for file_name, content in (files or {}).items():
        (directory / "files" / file_name).write_bytes(content)
    ca_pem = directory / "ca.pem"
    certs.cert_pem.write_to_path(ca_pem)
    cert_paths = issue_certs(directory / "certs", names, certs)
    ports = {"http": free_port(), "tls": free_port()}
    error_log, access_log = directory / "error.log", directory / "access.log"
    files_dir = directory / "files"
    servers = _nginx_server("default", ports, cert_paths["default.invalid"], files_dir, default=True)
    servers += "".join(_nginx_server(name, ports, cert_paths[name], files_dir, default=False) for name in names)
    conf = directory / "nginx.conf"
    conf.write_text(
        """
user root;
worker_processes 1;
pid %(dir)s/nginx.pid;
error_log %(error_log)s info;
events { worker_connections 512; }
http {
    access_log %(access_log)s;
    client_body_temp_path %(dir)s/client_body;
    proxy_temp_path %(dir)s/proxy;
    fastcgi_temp_path %(dir)s/fastcgi;
    uwsgi_temp_path %(dir)s/uwsgi;
    scgi_temp_path %(dir)s/scgi;
    default_type text/plain;
    keepalive_timeout 30s;
    keepalive_requests 1000;
    server_names_hash_bucket_size 128;
    ssl_protocols TLSv1.2 TLSv1.3;  # nginx 1.22 leaves TLS 1.3 out by default
%(servers)s
}
"""
        % {"dir": directory, "error_log": error_log, "access_log": access_log, "servers": servers},
        encoding="utf-8",
    )
    argv = [NGINX, "-p", str(directory), "-e", str(error_log), "-c", str(conf), "-g", "daemon off;"]
    return _launch("nginx", directory, argv, ports, (error_log, access_log), ca_pem)


# --- Apache httpd ---------------------------------------------------------------------------------
APACHE_LOADS = [
    ("mpm_event_module", "mod_mpm_event.so"),
    ("authz_core_module", "mod_authz_core.so"),
    ("headers_module", "mod_headers.so"),
    ("socache_shmcb_module", "mod_socache_shmcb.so"),
    ("ssl_module", "mod_ssl.so"),
    ("http2_module", "mod_http2.so"),
]


def _apache_vhost(name: str, ports: dict[str, int], cert: tuple[Path, Path], default: bool) -> str:
    """Apache will not serve files as root and its children (www-data) cannot read pytest's
    private tmp_path, so the answer is an ErrorDocument string: a 404 whose body names the vhost."""
    label = "default" if default else name
    common = 'ServerName %s\nErrorDocument 404 "served host=%%{HTTP_HOST} server=%s"\n' % (
        "default.invalid" if default else name,
        label,
    )
    common += 'Header always set X-Served-By "%s"\n' % label
    tls = "SSLEngine on\nSSLCertificateFile %s\nSSLCertificateKeyFile %s\n" % cert
    plain_vhost = "<VirtualHost 127.0.0.1:%d>\n%s</VirtualHost>\n" % (ports["http"], common)
    return plain_vhost + "<VirtualHost 127.0.0.1:%d>\n%s%s</VirtualHost>\n" % (ports["tls"], common, tls)


def start_apache(tmp_path: Path, names: list[str], certs: trustme.CA) -> Backend:
    """Apache httpd (event MPM) with mod_http2, `Protocols h2c http/1.1` and `H2Upgrade on`: a plain
    request with `Upgrade: h2c` is answered 101 and the connection carries HTTP/2 from then on. One
    VirtualHost per name on a plain and a TLS port, after a default first vhost."""
    directory = tmp_path / "apache"
    directory.mkdir(parents=True, exist_ok=True)
    ca_pem = directory / "ca.pem"
    certs.cert_pem.write_to_path(ca_pem)
    cert_paths = issue_certs(directory / "certs", names, certs)
    ports = {"http": free_port(), "tls": free_port()}
    error_log, access_log = directory / "error.log", directory / "access.log"
    loads = "".join("LoadModule %s %s\n" % (module, APACHE_MODULES / so) for module, so in APACHE_LOADS)
    vhosts = _apache_vhost("default", ports, cert_paths["default.invalid"], default=True)
    vhosts += "".join(_apache_vhost(name, ports, cert_paths[name], default=False) for name in names)
    conf = directory / "apache2.conf"
    conf.write_text(
        """ServerRoot %(dir)s
PidFile %(dir)s/apache2.pid
DefaultRuntimeDir %(dir)s
Mutex file:%(dir)s default
ErrorLog %(error_log)s
LogLevel warn
%(loads)sUser www-data
Group www-data
ServerName default.invalid
Listen 127.0.0.1:%(http)d
Listen 127.0.0.1:%(tls)d https
LogFormat "%%h %%{Host}i \\"%%r\\" %%>s %%v" vhost
CustomLog %(access_log)s vhost
SSLSessionCache shmcb:%(dir)s/ssl_scache(512000)
KeepAlive On
Protocols h2c http/1.1
H2Upgrade on
%(vhosts)s"""
        % {
            "dir": directory,
            "error_log": error_log,
            "access_log": access_log,
            "loads": loads,
            "http": ports["http"],
            "tls": ports["tls"],
            "vhosts": vhosts,
        },
        encoding="utf-8",
    )
    argv = [APACHE, "-f", str(conf), "-DFOREGROUND"]
    return _launch("apache", directory, argv, ports, (error_log, access_log), ca_pem)
