//! Test certificates, generated at run time (no private key is committed).

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

/// A test CA with one server and one client certificate, all PEM.
#[derive(Clone, Debug)]
pub struct TestPki {
    /// The CA certificate (trust anchor for both sides).
    pub ca_pem: String,
    /// Server certificate, valid for `localhost` and `127.0.0.1`.
    pub server_cert_pem: String,
    /// The server's private key.
    pub server_key_pem: String,
    /// Client certificate, with subject alternative name `client.example`.
    pub client_cert_pem: String,
    /// The client's private key.
    pub client_key_pem: String,
}

/// Generates a fresh CA, server and client certificate.
pub fn test_pki() -> TestPki {
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "libchan test CA");
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca cert");
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |names: Vec<String>| {
        let key = KeyPair::generate().expect("leaf key");
        let params = CertificateParams::new(names).expect("leaf params");
        let cert = params.signed_by(&key, &issuer).expect("leaf cert");
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert_pem, server_key_pem) = leaf(vec!["localhost".into(), "127.0.0.1".into()]);
    let (client_cert_pem, client_key_pem) = leaf(vec!["client.example".into()]);
    TestPki {
        ca_pem: ca_cert.pem(),
        server_cert_pem,
        server_key_pem,
        client_cert_pem,
        client_key_pem,
    }
}
