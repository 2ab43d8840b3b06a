//! Remote command execution: one message carries the command, its stdin, stdout and stderr
//! as byte streams, and a reply channel for the exit status. The server runs each command
//! as a real process; many run at once on one session. Over tcp, then over mutual TLS
//! (certificates generated in memory with rcgen).
//!
//! ```sh
//! cargo run --example rexec
//! ```

use libchan::{pipe, ByteStream, Options, Sender, Session};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// A command to run remotely.
#[derive(Serialize, Deserialize)]
struct Exec {
    program: String,
    args: Vec<String>,
    stdin: ByteStream,
    stdout: ByteStream,
    stderr: ByteStream,
    /// The exit code (or an error text if the command could not start).
    status: Sender<std::result::Result<i32, String>>,
}

/// The server: runs every command it receives, concurrently.
async fn serve(session: Session) -> Result<()> {
    let mut execs = session.accept::<Exec>().await?.ok_or("no channel")?;
    while let Some(exec) = execs.recv().await? {
        tokio::spawn(run(exec));
    }
    Ok(())
}

async fn run(exec: Exec) {
    let Exec {
        program,
        args,
        mut stdin,
        mut stdout,
        mut stderr,
        status,
    } = exec;
    let child = tokio::process::Command::new(&program)
        .args(&args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            let _ = status.send(Err(format!("{program}: {e}"))).await;
            return;
        }
    };
    let (Some(mut cin), Some(mut cout), Some(mut cerr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        let _ = status.send(Err("no pipes".into())).await;
        return;
    };
    let input = async {
        let _ = tokio::io::copy(&mut stdin, &mut cin).await;
        drop(cin); // end of the command's stdin
    };
    let output = async {
        let _ = tokio::io::copy(&mut cout, &mut stdout).await;
        let _ = stdout.shutdown().await;
    };
    let errors = async {
        let _ = tokio::io::copy(&mut cerr, &mut stderr).await;
        let _ = stderr.shutdown().await;
    };
    tokio::join!(input, output, errors);
    let code = match child.wait().await {
        Ok(s) => Ok(s.code().unwrap_or(-1)),
        Err(e) => Err(e.to_string()),
    };
    let _ = status.send(code).await;
}

/// The client side of one command: what it printed, and how it ended.
async fn remote(
    execs: &Sender<Exec>,
    program: &str,
    args: &[&str],
    input: &[u8],
) -> Result<(String, String, std::result::Result<i32, String>)> {
    let (mut stdin, stdin_far) = pipe();
    let (mut stdout, stdout_far) = pipe();
    let (mut stderr, stderr_far) = pipe();
    let (status_tx, mut status_rx) = libchan::channel(1);
    execs
        .send(Exec {
            program: program.into(),
            args: args.iter().map(|a| a.to_string()).collect(),
            stdin: stdin_far,
            stdout: stdout_far,
            stderr: stderr_far,
            status: status_tx,
        })
        .await
        .map_err(|e| e.error)?;
    let feed = async {
        stdin.write_all(input).await?;
        stdin.shutdown().await
    };
    let (mut out, mut err) = (String::new(), String::new());
    // A command that exits without reading its stdin ends the stream early: not an error.
    let (_fed, o, e) = tokio::join!(
        feed,
        stdout.read_to_string(&mut out),
        stderr.read_to_string(&mut err)
    );
    o?;
    e?;
    let status = status_rx.recv().await?.ok_or("no status")?;
    Ok((out, err, status))
}

async fn client(label: &str, session: Session) -> Result<()> {
    let execs = session.open::<Exec>().await?;
    let mut runs = Vec::new();
    for i in 0..8 {
        let execs = execs.clone();
        runs.push(tokio::spawn(async move {
            let input = format!("line {i}\n").repeat(1000);
            let r = remote(&execs, "wc", &["-l"], input.as_bytes()).await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((i, r))
        }));
    }
    for r in runs {
        let (i, (out, _, status)) = r.await??;
        if out.trim() != "1000" || status != Ok(0) {
            return Err(format!("command {i}: {out:?} {status:?}").into());
        }
    }
    let (out, err, status) =
        remote(&execs, "sh", &["-c", "echo out; echo err >&2; exit 3"], b"").await?;
    println!("[{label}] 8 concurrent `wc -l` of 1000 lines: all 1000, exit 0");
    println!(
        "[{label}] sh: stdout {:?}, stderr {:?}, status {status:?}",
        out.trim(),
        err.trim()
    );
    let (_, _, status) = remote(&execs, "/no/such/program", &[], b"").await?;
    println!("[{label}] missing program: {status:?}");
    Ok(())
}

/// Mutual TLS options: a CA, a server certificate for localhost and a client certificate.
fn tls_options() -> Result<Options> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let server_key = KeyPair::generate()?;
    let server =
        CertificateParams::new(vec!["localhost".into()])?.signed_by(&server_key, &issuer)?;
    let client_key = KeyPair::generate()?;
    let client =
        CertificateParams::new(vec!["rexec-client".into()])?.signed_by(&client_key, &issuer)?;
    let server_tls = libchan::tls::ServerTls::from_pem(
        server.pem().as_bytes(),
        server_key.serialize_pem().as_bytes(),
    )?
    .require_client_cert(ca.pem().as_bytes())?
    .build()?;
    let client_tls = libchan::tls::ClientTls::with_roots_pem(ca.pem().as_bytes())?
        .client_cert(
            client.pem().as_bytes(),
            client_key.serialize_pem().as_bytes(),
        )?
        .build()?;
    Ok(Options::new()
        .tls_server(server_tls)
        .tls_client(client_tls)
        .server_name("localhost"))
}

#[tokio::main]
async fn main() -> Result<()> {
    for (label, options, url) in [
        ("tcp", Options::new(), "tcp://127.0.0.1:0"),
        ("tls", tls_options()?, "tls://127.0.0.1:0"),
    ] {
        let listener = options.listen(url).await?;
        let local = listener.local_url();
        let (c, s) = tokio::join!(options.connect(&local), listener.accept());
        let server = s?;
        if label == "tls" {
            let who = server
                .peer_identity()
                .and_then(|p| p.subject_names().first().cloned());
            println!("[tls] client certificate names {who:?}");
        }
        tokio::spawn(serve(server));
        client(label, c?).await?;
    }
    Ok(())
}
