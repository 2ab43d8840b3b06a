//! Real reverse proxies (nginx, haproxy) started by tests on loopback.
//!
//! The test binds the proxy's listening socket itself and hands it to the proxy as
//! descriptor 3 (nginx: the `NGINX` environment variable it uses for binary upgrades;
//! haproxy: `bind fd@3`), so connections queue in the backlog from the start and no test
//! waits for the proxy to come up. The proxy is killed when the [`Proxy`] is dropped.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A running proxy process.
#[derive(Debug)]
pub struct Proxy {
    child: Child,
    dir: PathBuf,
    addr: SocketAddr,
    _listener: TcpListener,
}

impl Proxy {
    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The proxy's access log, if it writes one (nginx).
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default()
    }

    /// The proxy's error log or stderr capture, for failure messages.
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // SIGTERM, not SIGKILL: nginx's master then stops its worker too.
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn workdir(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "libchan-{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).expect("proxy work dir");
    dir
}

fn find(program: &str) -> PathBuf {
    for dir in [
        "/usr/sbin",
        "/usr/bin",
        "/usr/local/sbin",
        "/usr/local/bin",
        "/sbin",
    ] {
        let p = PathBuf::from(dir).join(program);
        if p.exists() {
            return p;
        }
    }
    panic!(
        "{program} is not installed: proxy tests run a real {program} \
         (apt-get install -y nginx haproxy; .ci/run does this)"
    );
}

/// Spawns `cmd` with `listener` as descriptor 3. (nginx must run with its master process:
/// nginx 1.22 without one crashes on inherited sockets.)
fn spawn_with_fd3(mut cmd: Command, listener: &TcpListener) -> io::Result<Child> {
    let fd = listener.as_raw_fd();
    // SAFETY: between fork and exec only dup2 runs, which is async-signal-safe; dup2
    // clears FD_CLOEXEC on the new descriptor so the proxy inherits it.
    // When the listener already is descriptor 3, dup2 does nothing, so FD_CLOEXEC is
    // cleared with fcntl instead.
    unsafe {
        cmd.pre_exec(move || {
            if fd == 3 {
                if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
            } else if libc::dup2(fd, 3) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// What nginx forwards to the upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NginxMode {
    /// HTTP/2 (h2c) in front, `grpc_pass grpc://upstream` behind: HTTP/2 end to end.
    Grpc,
    /// HTTP/1.1 in front, WebSocket upgrades passed with `proxy_pass` behind.
    WebSocket,
}

/// Starts nginx on loopback in front of `upstream`.
pub fn nginx(upstream: SocketAddr, mode: NginxMode) -> Proxy {
    let program = find("nginx");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy port");
    let addr = listener.local_addr().expect("proxy addr");
    let dir = workdir("nginx");
    let d = dir.display();
    let (listen, location) = match mode {
        NginxMode::Grpc => (
            format!("listen {addr} http2;"),
            format!(
                "grpc_pass grpc://{upstream};
                 grpc_read_timeout 3600s;
                 grpc_send_timeout 3600s;"
            ),
        ),
        NginxMode::WebSocket => (
            format!("listen {addr};"),
            format!(
                "proxy_pass http://{upstream};
                 proxy_http_version 1.1;
                 proxy_set_header Upgrade $http_upgrade;
                 proxy_set_header Connection \"upgrade\";
                 proxy_read_timeout 3600s;
                 proxy_send_timeout 3600s;
                 proxy_buffering off;"
            ),
        ),
    };
    let conf = format!(
        "daemon off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 8192; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    http2_max_concurrent_streams 10000;
    keepalive_timeout 3600s;
    keepalive_requests 100000000;
    client_body_timeout 3600s;
    client_max_body_size 0;
    server {{
        {listen}
        location / {{
            {location}
        }}
    }}
}}
"
    );
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, conf).expect("write nginx.conf");
    let mut cmd = Command::new(program);
    cmd.arg("-p")
        .arg(&dir)
        .arg("-c")
        .arg(&conf_path)
        .env("NGINX", "3;")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = spawn_with_fd3(cmd, &listener).expect("start nginx");
    Proxy {
        child,
        dir,
        addr,
        _listener: listener,
    }
}

/// Starts haproxy on loopback: HTTP/2 (h2c) in front and to `upstream`.
pub fn haproxy(upstream: SocketAddr) -> Proxy {
    let program = find("haproxy");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy port");
    let addr = listener.local_addr().expect("proxy addr");
    let dir = workdir("haproxy");
    let conf = format!(
        "global
    maxconn 4000
    tune.h2.max-concurrent-streams 10000
defaults
    mode http
    timeout connect 10s
    timeout client 1h
    timeout server 1h
    timeout tunnel 1h
frontend fe
    bind fd@3 proto h2
    default_backend be
backend be
    server s1 {upstream} proto h2
"
    );
    let conf_path = dir.join("haproxy.cfg");
    std::fs::write(&conf_path, conf).expect("write haproxy.cfg");
    let log = std::fs::File::create(dir.join("error.log")).expect("log file");
    let mut cmd = Command::new(program);
    cmd.arg("-db")
        .arg("-f")
        .arg(&conf_path)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log);
    let child = spawn_with_fd3(cmd, &listener).expect("start haproxy");
    Proxy {
        child,
        dir,
        addr,
        _listener: listener,
    }
}
