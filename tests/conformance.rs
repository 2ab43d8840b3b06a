//! The conformance suite, run against every transport that is compiled in.

use libchan::Session;
use libchan_test_support::Caps;

libchan_test_support::conformance!(
    mem,
    || async { Session::mem_pair() },
    libchan_test_support::Caps {
        fds: true,
        loss: false
    }
);

libchan_test_support::conformance!(
    unix,
    || async {
        libchan::unix::pair(&libchan::config())
            .await
            .expect("unix pair")
    },
    Caps {
        fds: true,
        loss: true
    }
);

async fn tcp_pair() -> (Session, Session) {
    let config = libchan::config();
    let listener = libchan::tcp::TcpListener::bind("127.0.0.1:0", config.clone())
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (a, b) = tokio::join!(libchan::tcp::connect(addr, &config), listener.accept());
    (a.expect("connect"), b.expect("accept"))
}

libchan_test_support::conformance!(
    tcp,
    tcp_pair,
    Caps {
        fds: false,
        loss: true
    }
);
