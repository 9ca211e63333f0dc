//! TLS for herald's ports, with rustls (protocol.md §11): the node's or
//! decision server's certificate and key, the trust a client or a dialling
//! node uses, and reloading a certificate on SIGHUP without dropping anyone.
//!
//! Only TLS 1.3 is offered, with the ALPN protocol `herald/1`. The crypto
//! is ring's. No sockets here: the event loop drives rustls through
//! the event loop's transport seam (`net/transport.rs`), the client library through a blocking
//! stream.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The ALPN protocol id every herald TLS connection negotiates.
pub const ALPN: &[u8] = b"herald/1";

/// Why TLS settings could not be loaded.
#[derive(Debug)]
pub enum TlsError {
    /// A file could not be read.
    Read {
        /// The file.
        path: PathBuf,
        /// The OS's error.
        source: io::Error,
    },
    /// A certificate file holds no PEM certificate.
    NoCertificate(PathBuf),
    /// A key file holds no PEM private key.
    NoKey(PathBuf),
    /// rustls refused the certificate, key or CA (e.g. a key that does not
    /// match the certificate).
    Rustls(rustls::Error),
    /// The trust anchors could not be built (no usable CA certificate).
    Roots(String),
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsError::Read { path, source } => write!(f, "cannot read {}: {source}", path.display()),
            TlsError::NoCertificate(p) => write!(f, "{} holds no PEM certificate", p.display()),
            TlsError::NoKey(p) => write!(f, "{} holds no PEM private key", p.display()),
            TlsError::Rustls(e) => write!(f, "TLS: {e}"),
            TlsError::Roots(m) => write!(f, "TLS trust anchors: {m}"),
        }
    }
}

impl std::error::Error for TlsError {}

impl From<rustls::Error> for TlsError {
    fn from(e: rustls::Error) -> TlsError {
        TlsError::Rustls(e)
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_owned(), source })
}

/// The certificates of a PEM file, in order (a leaf and its chain).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem).filter_map(Result::ok).collect();
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_owned()));
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|_| TlsError::NoKey(path.to_owned()))
}

/// Trust anchors from a PEM file of CA certificates.
pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(path)? {
        roots.add(c).map_err(|e| TlsError::Roots(format!("{}: {e}", path.display())))?;
    }
    Ok(roots)
}

/// The system's trust anchors.
pub fn system_roots() -> Result<RootCertStore, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        return Err(TlsError::Roots(format!("no system CA certificates found ({:?})", found.errors)));
    }
    Ok(roots)
}

/// What a server port presents and whom it asks for a certificate.
#[derive(Debug, Clone)]
pub struct ServerFiles {
    /// The certificate chain (PEM: the leaf first).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// Client certificates must chain to this CA (mutual TLS); none: no
    /// client certificate is asked for.
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: a client may also present no certificate at all
    /// (the ingest port, where publishers have none and mesh peers have
    /// one); a certificate it presents must still chain to the CA.
    pub client_cert_optional: bool,
}

/// The ALPN protocol id of a node's metrics port over TLS (HTTPS).
pub const ALPN_HTTP: &[u8] = b"http/1.1";

impl ServerFiles {
    /// Builds the rustls server configuration from the files, for a herald
    /// port (ALPN `herald/1`).
    pub fn config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        self.config_for(ALPN)
    }

    /// Builds the rustls server configuration from the files, offering the
    /// one ALPN protocol `alpn`.
    pub fn config_for(&self, alpn: &[u8]) -> Result<Arc<ServerConfig>, TlsError> {
        let certs = load_certs(&self.cert)?;
        let key = load_key(&self.key)?;
        let builder = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?;
        let builder = match &self.client_ca {
            Some(ca) => {
                let mut b =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(load_roots(ca)?), provider());
                if self.client_cert_optional {
                    b = b.allow_unauthenticated();
                }
                let v = b.build().map_err(|e| TlsError::Roots(e.to_string()))?;
                builder.with_client_cert_verifier(v)
            }
            None => builder.with_no_client_auth(),
        };
        let mut cfg = builder.with_single_cert(certs, key)?;
        cfg.alpn_protocols = vec![alpn.to_vec()];
        Ok(Arc::new(cfg))
    }
}

/// A server port's TLS: the configuration in force, which a reload
/// replaces. New handshakes take the configuration current when they start;
/// connections already up keep theirs.
#[derive(Clone)]
pub struct Acceptor {
    files: ServerFiles,
    alpn: &'static [u8],
    current: Arc<RwLock<Arc<ServerConfig>>>,
}

impl Acceptor {
    /// Loads the files; an error names the file and what is wrong with it.
    pub fn load(files: ServerFiles) -> Result<Acceptor, TlsError> {
        Acceptor::load_for(files, ALPN)
    }

    /// [`Acceptor::load`] for a port that speaks `alpn` (e.g. [`ALPN_HTTP`]).
    pub fn load_for(files: ServerFiles, alpn: &'static [u8]) -> Result<Acceptor, TlsError> {
        let cfg = files.config_for(alpn)?;
        Ok(Acceptor { files, alpn, current: Arc::new(RwLock::new(cfg)) })
    }

    /// The configuration for a new handshake.
    pub fn config(&self) -> Arc<ServerConfig> {
        match self.current.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Loads the files again. On success new handshakes use the new
    /// certificate; on failure the old one stays in use and the error says why.
    pub fn reload(&self) -> Result<(), TlsError> {
        let cfg = self.files.config_for(self.alpn)?;
        match self.current.write() {
            Ok(mut c) => *c = cfg,
            Err(poisoned) => *poisoned.into_inner() = cfg,
        }
        Ok(())
    }

    /// The certificate file.
    pub fn cert_path(&self) -> &Path {
        &self.files.cert
    }
}

/// The configuration a node dials its mesh peers with: it trusts only the
/// cluster CA (a peer must prove it is a node of this cluster) and presents
/// the node's own certificate, so the peer can check its node id in turn.
pub fn mesh_client_config(cert: &Path, key: &Path, cluster_ca: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(load_roots(cluster_ca)?)
        .with_client_auth_cert(load_certs(cert)?, load_key(key)?)?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(cfg))
}

/// How a node dials its mesh peers: [`mesh_client_config`] from its files,
/// reloadable like an [`Acceptor`] (SIGHUP rotates the certificate it
/// presents to peers too).
#[derive(Clone)]
pub struct Dialer {
    cert: PathBuf,
    key: PathBuf,
    cluster_ca: PathBuf,
    current: Arc<RwLock<Arc<ClientConfig>>>,
}

impl Dialer {
    /// Loads the node's certificate and key and the cluster CA.
    pub fn load(cert: &Path, key: &Path, cluster_ca: &Path) -> Result<Dialer, TlsError> {
        let cfg = mesh_client_config(cert, key, cluster_ca)?;
        Ok(Dialer {
            cert: cert.to_owned(),
            key: key.to_owned(),
            cluster_ca: cluster_ca.to_owned(),
            current: Arc::new(RwLock::new(cfg)),
        })
    }

    /// The configuration for a new dial.
    pub fn config(&self) -> Arc<ClientConfig> {
        match self.current.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Loads the files again; on failure the old configuration stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let cfg = mesh_client_config(&self.cert, &self.key, &self.cluster_ca)?;
        match self.current.write() {
            Ok(mut c) => *c = cfg,
            Err(poisoned) => *poisoned.into_inner() = cfg,
        }
        Ok(())
    }
}

/// Everything of a node's TLS that SIGHUP reloads.
#[derive(Clone, Default)]
pub struct Reload {
    /// The TLS ports.
    pub acceptors: Vec<Acceptor>,
    /// The mesh dialler.
    pub dialer: Option<Dialer>,
}

impl Reload {
    /// Whether there is nothing to reload.
    pub fn is_empty(&self) -> bool {
        self.acceptors.is_empty() && self.dialer.is_none()
    }

    /// Reloads every part; returns what each reload said, named by file.
    pub fn reload(&self) -> Vec<(PathBuf, Result<(), TlsError>)> {
        let mut out: Vec<_> = self.acceptors.iter().map(|a| (a.cert_path().to_owned(), a.reload())).collect();
        if let Some(d) = &self.dialer {
            out.push((d.cert.clone(), d.reload()));
        }
        out
    }
}

/// Whether the certificate `der` names `name` among its DNS subject
/// alternative names (how a node's id is bound to its certificate).
pub fn names(der: &[u8], name: &str) -> bool {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else { return false };
    let Ok(Some(san)) = cert.subject_alternative_name() else { return false };
    san.value
        .general_names
        .iter()
        .any(|g| matches!(g, GeneralName::DNSName(d) if d.eq_ignore_ascii_case(name)))
}

/// Whom a TLS client trusts: what `--tls` (the system's CA store) and
/// `--tls-ca FILE` (only the CA certificates of that PEM file) say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// The system's CA store.
    System,
    /// Only the CA certificates of this PEM file (replacing the system store).
    Ca(PathBuf),
}

impl Trust {
    /// From a pair of flags: `--tls` alone is the system store, a CA file
    /// (with or without `--tls`) is that file; neither is plaintext (none).
    pub fn from_flags(tls: bool, ca: Option<PathBuf>) -> Option<Trust> {
        match (tls, ca) {
            (_, Some(ca)) => Some(Trust::Ca(ca)),
            (true, None) => Some(Trust::System),
            (false, None) => None,
        }
    }

    /// The client configuration a pair of flags asks for (see
    /// [`Trust::from_flags`]); none: plaintext.
    pub fn config_from_flags(tls: bool, ca: Option<PathBuf>) -> Result<Option<Arc<ClientConfig>>, TlsError> {
        Trust::from_flags(tls, ca).map(|t| t.config()).transpose()
    }

    /// The client configuration ([`client_config`]).
    pub fn config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        match self {
            Trust::System => client_config(None),
            Trust::Ca(p) => client_config(Some(p)),
        }
    }
}

/// A TLS client configuration trusting the CA certificates in `ca` (PEM),
/// or the system's roots when `ca` is none.
pub fn client_config(ca: Option<&Path>) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = match ca {
        Some(p) => load_roots(p)?,
        None => system_roots()?,
    };
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(cfg))
}

/// The name a client verifies a server's certificate for, from the
/// server's endpoint (`host:port`, `[v6]:port`): a DNS name, or an IP
/// address (checked against the certificate's IP SANs).
pub fn server_name(endpoint: &str) -> io::Result<rustls_pki_types::ServerName<'static>> {
    let host = endpoint.rsplit_once(':').map_or(endpoint, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    rustls_pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{endpoint}: {e}")))
}
