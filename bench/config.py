"""Configuration files the harness generates for the off-the-shelf balancers.

Both are set up the way one would for token streaming: no response buffering, HTTP/1.1 with
keep-alive to the backends, long read timeouts, one worker process/thread (like one gateway
process), and a response header naming the backend that served the request.
"""

from __future__ import annotations

import os
from pathlib import Path

METHODS = {
    "rr": "",
    "lc": "    least_conn;\n",
    "hash": "    hash $http_x_session_id consistent;\n",  # sticky: a session's turns, one backend
}


def nginx_conf(workdir: Path, port: int, backends: list[int], *, method: str = "rr") -> str:
    """``method``: rr (round-robin), lc (least_conn) or hash (consistent hash of the
    ``X-Session-Id`` header)."""
    servers = "\n".join(f"    server 127.0.0.1:{p};" for p in backends)
    user = "user root;\n" if os.geteuid() == 0 else ""
    method = METHODS[method]
    temp = "\n".join(
        f"  {kind}_temp_path {workdir}/{kind}_temp;"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""{user}worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 20000; }}
http {{
  access_log off;
{temp}
  upstream backends {{
{method}{servers}
    keepalive 256;
  }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      proxy_pass http://backends;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering off;
      proxy_read_timeout 600s;
      proxy_next_upstream error timeout;
      add_header X-Backend $upstream_addr always;
    }}
  }}
}}
"""


def haproxy_cfg(
    workdir: Path, port: int, backends: list[tuple[str, int, int]], *, queue_timeout_s: float
) -> str:
    """``backends``: (name, port, maxconn). leastconn + maxconn per server: requests beyond
    every server's maxconn wait in haproxy's queue, and get 503 after ``queue_timeout_s``."""
    servers = "\n".join(
        f"  server {name} 127.0.0.1:{p} maxconn {maxconn} check inter 500 fall 2 rise 1"
        for name, p, maxconn in backends
    )
    return f"""global
  maxconn 8000
  nbthread 1
  pidfile {workdir}/haproxy.pid
defaults
  mode http
  timeout connect 2s
  timeout client 600s
  timeout server 600s
  timeout queue {int(queue_timeout_s * 1000)}ms
  timeout http-request 10s
  option http-no-delay
frontend fe
  bind 127.0.0.1:{port}
  default_backend be
backend be
  balance leastconn
  option httpchk GET /health
  http-reuse safe
  http-response set-header X-Backend %[srv_name]
{servers}
"""
