//! Certificates generated in the test (rcgen): a CA, a server certificate
//! for `svc.test` and 127.0.0.1, and a client certificate, as PEM files.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};

pub struct TestPki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl TestPki {
    /// Writes a fresh PKI into `dir`.
    pub fn generate(dir: &Path) -> Result<TestPki, rcgen::Error> {
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "wisp test CA");
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);

        let leaf = |names: Vec<String>,
                    usage: ExtendedKeyUsagePurpose|
         -> Result<(String, String), rcgen::Error> {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(names)?;
            params.extended_key_usages.push(usage);
            params.use_authority_key_identifier_extension = true;
            Ok((params.signed_by(&key, &issuer)?.pem(), key.serialize_pem()))
        };
        let (server_cert, server_key) = leaf(
            vec!["svc.test".into(), "127.0.0.1".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
        )?;
        let (client_cert, client_key) = leaf(
            vec!["client.test".into()],
            ExtendedKeyUsagePurpose::ClientAuth,
        )?;

        let write = |name: &str, pem: &str| {
            let path = dir.join(name);
            std::fs::write(&path, pem).expect("writing a PEM file into the test directory");
            path
        };
        Ok(TestPki {
            ca: write("ca.pem", &ca_cert.pem()),
            server_cert: write("server.pem", &server_cert),
            server_key: write("server-key.pem", &server_key),
            client_cert: write("client.pem", &client_cert),
            client_key: write("client-key.pem", &client_key),
        })
    }
}

impl TestPki {
    /// The quick-mode flags of a wisp that terminates TLS with the server
    /// certificate and requires client certificates signed by the CA (mTLS).
    pub fn mtls_server_flags(&self) -> Vec<String> {
        let p = |path: &Path| path.display().to_string();
        vec![
            "--tls-cert".into(),
            p(&self.server_cert),
            "--tls-key".into(),
            p(&self.server_key),
            "--tls-client-ca".into(),
            p(&self.ca),
        ]
    }
}
