//! Throwaway TLS material for tests: a CA, a server certificate and a client
//! certificate it signed, all PEM files, made with `rcgen`; owned by the lb-tests
//! harness and used with [`crate::etcd::EtcdServer`] (etcd with client-certificate
//! authentication) and by the load balancers' etcd clients in tests.
//!
//! Keys are ECDSA P-256 (PKCS#8 PEM, `-----BEGIN PRIVATE KEY-----`), which etcd (Go)
//! and rustls both read. Certificates are valid from 1975 to 4096 (rcgen's default),
//! so no test ever meets an expired one. The server certificate is for the IP
//! addresses it is given plus 127.0.0.1 and `localhost`, and is good for both server
//! and client authentication: etcd 3.4's HTTP gateway dials its own gRPC port with
//! the server certificate as a client certificate. The client certificate is for
//! client authentication only. [`generate_untrusted_client`] makes a client
//! certificate from an unrelated CA, for the negative test.

use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// The PEM files of a CA and the server and client certificates it signed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA certificate: what the server trusts for client certificates and what
    /// clients trust for the server's.
    pub ca: PathBuf,
    /// The server's certificate.
    pub server_cert: PathBuf,
    /// The server's private key.
    pub server_key: PathBuf,
    /// The client's certificate.
    pub client_cert: PathBuf,
    /// The client's private key.
    pub client_key: PathBuf,
}

/// The PEM files of a client certificate signed by a CA that no server trusts, and
/// that CA's certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UntrustedClient {
    /// The unrelated CA's certificate (a client that trusts only it also rejects the
    /// real server).
    pub ca: PathBuf,
    /// The client's certificate, signed by the unrelated CA.
    pub client_cert: PathBuf,
    /// The client's private key.
    pub client_key: PathBuf,
}

/// The common name of the server certificate.
pub const SERVER_NAME: &str = "lb-tests etcd";
/// The common name of the client certificate.
pub const CLIENT_NAME: &str = "lb-tests client";

/// Writes a fresh CA (`ca.pem`), a server certificate for `server_ips` plus
/// 127.0.0.1 and `localhost` (`server.pem`, `server-key.pem`) and a client
/// certificate (`client.pem`, `client-key.pem`), both signed by the CA, into `dir`
/// (which must exist; files there of the same names are replaced). Keys are written
/// with mode 0600.
pub fn generate(dir: &Path, server_ips: &[IpAddr]) -> Result<TlsFiles> {
    let (ca_pem, ca) = new_ca("lb-tests CA")?;

    let mut sans: Vec<SanType> = server_ips.iter().copied().map(SanType::IpAddress).collect();
    let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
    if !server_ips.contains(&loopback) {
        sans.push(SanType::IpAddress(loopback));
    }
    sans.push(SanType::DnsName(
        "localhost".try_into().context("localhost as a DNS name")?,
    ));
    let (server_pem, server_key) = new_leaf(
        SERVER_NAME,
        sans,
        &[
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
        &ca,
    )?;
    let (client_pem, client_key) = new_leaf(
        CLIENT_NAME,
        Vec::new(),
        &[ExtendedKeyUsagePurpose::ClientAuth],
        &ca,
    )?;

    let files = TlsFiles {
        ca: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server-key.pem"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client-key.pem"),
    };
    write_file(&files.ca, &ca_pem, 0o644)?;
    write_file(&files.server_cert, &server_pem, 0o644)?;
    write_file(&files.server_key, &server_key, 0o600)?;
    write_file(&files.client_cert, &client_pem, 0o644)?;
    write_file(&files.client_key, &client_key, 0o600)?;
    Ok(files)
}

/// Writes an unrelated CA (`untrusted-ca.pem`) and a client certificate it signed
/// (`untrusted-client.pem`, `untrusted-client-key.pem`) into `dir`: a client that
/// presents it must be refused by a server that trusts only [`generate`]'s CA.
pub fn generate_untrusted_client(dir: &Path) -> Result<UntrustedClient> {
    let (ca_pem, ca) = new_ca("lb-tests untrusted CA")?;
    let (client_pem, client_key) = new_leaf(
        CLIENT_NAME,
        Vec::new(),
        &[ExtendedKeyUsagePurpose::ClientAuth],
        &ca,
    )?;
    let files = UntrustedClient {
        ca: dir.join("untrusted-ca.pem"),
        client_cert: dir.join("untrusted-client.pem"),
        client_key: dir.join("untrusted-client-key.pem"),
    };
    write_file(&files.ca, &ca_pem, 0o644)?;
    write_file(&files.client_cert, &client_pem, 0o644)?;
    write_file(&files.client_key, &client_key, 0o600)?;
    Ok(files)
}

/// A self-signed CA: its certificate's PEM and the issuer that signs with its key.
fn new_ca(name: &str) -> Result<(String, Issuer<'static, KeyPair>)> {
    let key = KeyPair::generate().context("generating a CA key")?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params
        .self_signed(&key)
        .with_context(|| format!("self-signing CA {name}"))?;
    Ok((cert.pem(), Issuer::new(params, key)))
}

/// A certificate for `sans` signed by `ca`: its PEM and its private key's PEM.
fn new_leaf(
    name: &str,
    sans: Vec<SanType>,
    usages: &[ExtendedKeyUsagePurpose],
    ca: &Issuer<'_, KeyPair>,
) -> Result<(String, String)> {
    let key = KeyPair::generate().with_context(|| format!("generating the key of {name}"))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = usages.to_vec();
    params.use_authority_key_identifier_extension = true;
    let cert = params
        .signed_by(&key, ca)
        .with_context(|| format!("signing the certificate of {name}"))?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Writes `contents` to `path` (replacing it) with permission bits `mode`.
fn write_file(path: &Path, contents: &str, mode: u32) -> Result<()> {
    use std::io::Write;
    let _ = std::fs::remove_file(path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(contents.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scratch::ScratchDir;
    use std::os::unix::fs::PermissionsExt;

    fn pem_kinds(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .filter_map(|l| l.strip_prefix("-----BEGIN "))
            .map(|l| l.trim_end_matches('-').to_owned())
            .collect()
    }

    #[test]
    fn writes_pem_files_with_private_keys() {
        let dir = ScratchDir::new("certs-unit").unwrap();
        let ip: IpAddr = "198.18.0.200".parse().unwrap();
        let files = generate(dir.path(), &[ip]).unwrap();
        for cert in [&files.ca, &files.server_cert, &files.client_cert] {
            assert_eq!(pem_kinds(cert), ["CERTIFICATE"], "{}", cert.display());
        }
        for key in [&files.server_key, &files.client_key] {
            assert_eq!(pem_kinds(key), ["PRIVATE KEY"], "{}", key.display());
            let mode = std::fs::metadata(key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", key.display());
        }
        let untrusted = generate_untrusted_client(dir.path()).unwrap();
        assert_ne!(
            std::fs::read(&untrusted.ca).unwrap(),
            std::fs::read(&files.ca).unwrap()
        );
        // Generating again replaces the files.
        let again = generate(dir.path(), &[ip]).unwrap();
        assert_eq!(again, files);
    }

    /// With openssl at hand, the chain and the addresses are checked by a verifier
    /// that is not rcgen's.
    #[test]
    fn openssl_accepts_the_chain_when_present() {
        let Ok(version) = std::process::Command::new("openssl")
            .arg("version")
            .output()
        else {
            eprintln!("openssl not found; skipped");
            return;
        };
        assert!(version.status.success());
        let dir = ScratchDir::new("certs-unit").unwrap();
        let ip: IpAddr = "198.18.0.200".parse().unwrap();
        let files = generate(dir.path(), &[ip]).unwrap();
        let untrusted = generate_untrusted_client(dir.path()).unwrap();
        let verify = |cert: &Path, purpose: &str, extra: &[&str]| {
            std::process::Command::new("openssl")
                .arg("verify")
                .arg("-CAfile")
                .arg(&files.ca)
                .args(["-purpose", purpose])
                .args(extra)
                .arg(cert)
                .output()
                .unwrap()
        };
        for ip in ["198.18.0.200", "127.0.0.1"] {
            let out = verify(&files.server_cert, "sslserver", &["-verify_ip", ip]);
            assert!(out.status.success(), "{ip}: {out:?}");
        }
        let out = verify(
            &files.server_cert,
            "sslserver",
            &["-verify_ip", "198.18.0.201"],
        );
        assert!(!out.status.success(), "a foreign address verified");
        let out = verify(&files.client_cert, "sslclient", &[]);
        assert!(out.status.success(), "{out:?}");
        let out = verify(&untrusted.client_cert, "sslclient", &[]);
        assert!(!out.status.success(), "the untrusted client verified");
    }
}
