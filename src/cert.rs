//! Development certificates: a private CA and the TLS certificates it issues
//! to nodes and decision servers (`herald cert`; also for tests and demos).
//!
//! This is for development and test clusters, so that a new user can start a
//! TLS cluster in a minute; a production deployment brings certificates from
//! its own PKI. Certificates are made with [`rcgen`] (ring backend):
//!
//! - the CA ([`new_ca`]) is self-signed, `CA:TRUE` with path length 0 (it
//!   signs leaves only), key usages keyCertSign, cRLSign, digitalSignature;
//! - a leaf ([`Ca::issue`]) has its name as subject common name and as a DNS
//!   subject alternative name, plus the DNS names and IP addresses asked for.
//!   A node's id must be one of its DNS SANs: mesh peers check the node id
//!   against them. Key usage digitalSignature, extended key usages serverAuth
//!   and clientAuth (a node dials its peers with the same certificate);
//! - every key is a fresh ECDSA P-256 key (`PKCS_ECDSA_P256_SHA256`).
//!
//! Files: a CA directory holds `ca.pem` (the certificate) and `ca.key` (its
//! private key, PKCS#8 PEM). A leaf `NAME` is written as `NAME.pem` (the leaf
//! certificate followed by the CA certificate) and `NAME.key`. Key files are
//! created with mode 0600, certificates with 0644. Nothing is overwritten
//! unless `force` is given.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType,
};

/// The CA certificate's file name in a CA directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// The CA private key's file name in a CA directory.
pub const CA_KEY_FILE: &str = "ca.key";
/// The CA's subject common name unless another is given.
pub const DEFAULT_CA_NAME: &str = "herald dev CA";
/// How long a CA is valid unless told otherwise, in days.
pub const DEFAULT_CA_DAYS: u32 = 365;
/// How long a leaf certificate is valid unless told otherwise, in days.
pub const DEFAULT_LEAF_DAYS: u32 = 90;

/// How far before "now" a certificate's validity starts, so that a peer whose
/// clock is a little behind does not see it as not yet valid.
const BACKDATE: Duration = Duration::from_secs(300);
/// The latest time an X.509 certificate can carry: 9999-12-31T23:59:59Z.
const MAX_NOT_AFTER_SECS: u64 = 253_402_300_799;
/// The longest DNS name (RFC 1035).
const MAX_DNS_NAME_LEN: usize = 253;

/// Why a certificate could not be made, loaded or written.
#[derive(Debug)]
pub enum CertError {
    /// A file or directory could not be read, written or created.
    Io(PathBuf, io::Error),
    /// rcgen could not generate a key or a certificate.
    Rcgen(rcgen::Error),
    /// The CA files cannot be used: the file, and why.
    BadCa(PathBuf, String),
    /// The file exists already, and overwriting was not asked for.
    FileExists(PathBuf),
    /// A certificate name or DNS name cannot be used: the name, and why.
    BadName(String, &'static str),
}

impl fmt::Display for CertError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CertError::Io(p, e) => write!(f, "{}: {e}", p.display()),
            CertError::Rcgen(e) => write!(f, "cannot generate the certificate: {e}"),
            CertError::BadCa(p, why) => write!(f, "{}: not a usable CA: {why}", p.display()),
            CertError::FileExists(p) => {
                write!(f, "{} exists already (give --force to overwrite it)", p.display())
            }
            CertError::BadName(n, why) => write!(f, "`{n}` cannot be used as a name: {why}"),
        }
    }
}

impl std::error::Error for CertError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CertError::Io(_, e) => Some(e),
            CertError::Rcgen(e) => Some(e),
            _ => None,
        }
    }
}

impl From<rcgen::Error> for CertError {
    fn from(e: rcgen::Error) -> CertError {
        CertError::Rcgen(e)
    }
}

/// When a certificate is valid: from `not_before` to `not_after` (both
/// inclusive, to the second). Either may be in the past, to make expired
/// certificates for tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    /// The first moment the certificate is valid.
    pub not_before: SystemTime,
    /// The last moment the certificate is valid.
    pub not_after: SystemTime,
}

impl Validity {
    /// Valid from five minutes ago (for peers whose clocks lag a little)
    /// until `days` days from now.
    pub fn days_from_now(days: u32) -> Validity {
        let now = SystemTime::now();
        Validity {
            not_before: now.checked_sub(BACKDATE).unwrap_or(now),
            not_after: now + Duration::from_secs(u64::from(days) * 86_400),
        }
    }
}

/// A certificate authority: its certificate and the key it signs with.
#[derive(Debug)]
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

/// A leaf certificate issued by a [`Ca`], with its private key.
#[derive(Clone)]
pub struct Issued {
    /// The name it was issued for (subject common name and first DNS SAN);
    /// [`Issued::save`] names the files after it.
    pub name: String,
    /// The leaf certificate followed by the CA certificate, PEM.
    pub cert_chain_pem: String,
    /// The leaf's private key, PKCS#8 PEM.
    pub key_pem: String,
}

impl fmt::Debug for Issued {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issued")
            .field("name", &self.name)
            .field("cert_chain_pem", &self.cert_chain_pem)
            .field("key_pem", &"[elided]")
            .finish()
    }
}

/// Makes a new CA named `name` (its subject common name), valid for `days`
/// days, with a fresh ECDSA P-256 key.
pub fn new_ca(name: &str, days: u32) -> Result<Ca, CertError> {
    new_ca_with_validity(name, Validity::days_from_now(days))
}

/// [`new_ca`] with an explicit validity (for tests: an expired CA).
pub fn new_ca_with_validity(name: &str, validity: Validity) -> Result<Ca, CertError> {
    if name.trim().is_empty() {
        return Err(CertError::BadName(name.to_owned(), "the CA name is empty"));
    }
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name(name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    set_validity(&mut params, validity);
    let cert = params.self_signed(&key)?;
    Ok(Ca { cert_pem: cert.pem(), issuer: Issuer::new(params, key) })
}

impl Ca {
    /// Loads `dir/ca.pem` and `dir/ca.key`. Refuses a certificate that is not
    /// a CA or has expired, and a key that is not the certificate's.
    pub fn load(dir: &Path) -> Result<Ca, CertError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let cert_file = fs::read_to_string(&cert_path).map_err(|e| CertError::Io(cert_path.clone(), e))?;
        let key_file = fs::read_to_string(&key_path).map_err(|e| CertError::Io(key_path.clone(), e))?;
        let bad = |p: &Path, why: String| CertError::BadCa(p.to_owned(), why);

        let cert_pem = first_certificate(&cert_file)
            .ok_or_else(|| bad(&cert_path, "no PEM CERTIFICATE block".to_owned()))?
            .to_owned();
        let key = KeyPair::from_pem(&key_file)
            .map_err(|e| bad(&key_path, format!("not a PEM private key: {e}")))?;
        let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
            .map_err(|e| bad(&cert_path, format!("not a PEM certificate: {e}")))?;
        let x509 = pem.parse_x509().map_err(|e| bad(&cert_path, format!("not an X.509 certificate: {e}")))?;
        if !x509.is_ca() {
            return Err(bad(&cert_path, "not a CA certificate (no basicConstraints CA:TRUE)".to_owned()));
        }
        if !x509.validity().is_valid() {
            return Err(bad(
                &cert_path,
                format!(
                    "valid from {} to {} only; make a new CA",
                    x509.validity().not_before,
                    x509.validity().not_after
                ),
            ));
        }
        if x509.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice() {
            return Err(bad(
                &key_path,
                format!("this key does not belong to the certificate in {CA_CERT_FILE}"),
            ));
        }
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
            .map_err(|e| bad(&cert_path, format!("cannot sign with it: {e}")))?;
        Ok(Ca { issuer, cert_pem })
    }

    /// Writes `dir/ca.pem` and `dir/ca.key` (0600), creating `dir` if need
    /// be; returns the paths written. Without `force`, writes nothing if
    /// either file exists.
    pub fn save(&self, dir: &Path, force: bool) -> Result<Vec<PathBuf>, CertError> {
        let files = [
            (dir.join(CA_CERT_FILE), self.cert_pem.clone(), false),
            (dir.join(CA_KEY_FILE), self.key_pem(), true),
        ];
        write_files(dir, &files, force)
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> String {
        self.cert_pem.clone()
    }

    /// The CA's private key, PKCS#8 PEM.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Issues a leaf certificate for `name`, valid for `days` days, with DNS
    /// SANs `name` and `dns` and IP SANs `ips` (see the [module docs](self)).
    pub fn issue(&self, name: &str, dns: &[String], ips: &[IpAddr], days: u32) -> Result<Issued, CertError> {
        self.issue_with_validity(name, dns, ips, Validity::days_from_now(days))
    }

    /// [`Ca::issue`] with an explicit validity (for tests: an expired or a
    /// not yet valid certificate).
    pub fn issue_with_validity(
        &self,
        name: &str,
        dns: &[String],
        ips: &[IpAddr],
        validity: Validity,
    ) -> Result<Issued, CertError> {
        check_dns_name(name)?;
        let mut names: Vec<&str> = vec![name];
        for d in dns {
            check_dns_name(d)?;
            if !names.iter().any(|n| n.eq_ignore_ascii_case(d)) {
                names.push(d);
            }
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name(name);
        for n in names {
            let n = n.try_into()?;
            params.subject_alt_names.push(SanType::DnsName(n));
        }
        for ip in ips {
            if !params.subject_alt_names.contains(&SanType::IpAddress(*ip)) {
                params.subject_alt_names.push(SanType::IpAddress(*ip));
            }
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, validity);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let mut cert_chain_pem = cert.pem();
        if !cert_chain_pem.ends_with('\n') {
            cert_chain_pem.push('\n');
        }
        cert_chain_pem.push_str(&self.cert_pem);
        Ok(Issued { name: name.to_owned(), cert_chain_pem, key_pem: key.serialize_pem() })
    }
}

impl Issued {
    /// Writes `dir/NAME.pem` (leaf then CA) and `dir/NAME.key` (0600),
    /// creating `dir` if need be; returns the paths written. Without `force`,
    /// writes nothing if either file exists.
    pub fn save(&self, dir: &Path, force: bool) -> Result<Vec<PathBuf>, CertError> {
        check_dns_name(&self.name)?;
        let (cert, key) = leaf_paths(dir, &self.name);
        write_files(
            dir,
            &[(cert, self.cert_chain_pem.clone(), false), (key, self.key_pem.clone(), true)],
            force,
        )
    }
}

/// Where a leaf certificate `name` lives in `dir`: (`NAME.pem`, `NAME.key`).
pub fn leaf_paths(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")))
}

/// `herald cert dev`: a new CA in `dir` and one certificate per node and
/// decision server named, each with DNS SANs its name and `localhost` and IP
/// SAN 127.0.0.1. Empty names are skipped. Returns the paths written. Without
/// `force`, writes nothing if any of the files exists.
pub fn write_dev_set(
    dir: &Path,
    nodes: &[String],
    decision: &[String],
    force: bool,
) -> Result<Vec<PathBuf>, CertError> {
    let names: Vec<&str> =
        nodes.iter().chain(decision).map(String::as_str).filter(|n| !n.is_empty()).collect();
    for (i, n) in names.iter().enumerate() {
        check_dns_name(n)?;
        if n.eq_ignore_ascii_case("ca") {
            return Err(CertError::BadName((*n).to_owned(), "its files would be the CA's"));
        }
        if names[..i].iter().any(|m| m.eq_ignore_ascii_case(n)) {
            return Err(CertError::BadName((*n).to_owned(), "it is listed twice"));
        }
    }
    if !force {
        let mut all = vec![dir.join(CA_CERT_FILE), dir.join(CA_KEY_FILE)];
        for n in &names {
            let (c, k) = leaf_paths(dir, n);
            all.extend([c, k]);
        }
        refuse_existing(&all)?;
    }
    let ca = new_ca(DEFAULT_CA_NAME, DEFAULT_CA_DAYS)?;
    let mut written = ca.save(dir, force)?;
    let dns = ["localhost".to_owned()];
    let ips = [IpAddr::V4(Ipv4Addr::LOCALHOST)];
    for n in names {
        written.extend(ca.issue(n, &dns, &ips, DEFAULT_LEAF_DAYS)?.save(dir, force)?);
    }
    Ok(written)
}

/// The one-line hint `herald cert dev` prints: the TLS flags a node (the
/// first of `nodes`) and its clients use with the files in `dir`.
pub fn dev_hint(dir: &Path, nodes: &[String]) -> String {
    let node = nodes.iter().find(|n| !n.is_empty()).map_or("NAME", String::as_str);
    let (cert, key) = leaf_paths(dir, node);
    format!(
        "node {node}: --tls-cert {} --tls-key {} (each node and decision server its own NAME.pem/NAME.key); \
         clients and peers: --tls-ca {}",
        cert.display(),
        key.display(),
        dir.join(CA_CERT_FILE).display()
    )
}

fn common_name(name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn
}

fn set_validity(params: &mut CertificateParams, v: Validity) {
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    let since_epoch = |t: SystemTime| {
        let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
        d.min(Duration::from_secs(MAX_NOT_AFTER_SECS))
    };
    params.not_before = epoch + since_epoch(v.not_before);
    params.not_after = epoch + since_epoch(v.not_after);
}

/// A name usable both as a DNS SAN and as a file name: dot-separated labels
/// of ASCII letters, digits, `-` and `_`, no label empty or starting or
/// ending with `-`, and not all digits at the end (that is an IP address:
/// use an IP SAN).
fn check_dns_name(name: &str) -> Result<(), CertError> {
    let bad = |why| Err(CertError::BadName(name.to_owned(), why));
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > MAX_DNS_NAME_LEN {
        return bad("a DNS name is at most 253 bytes");
    }
    for label in name.split('.') {
        if label.is_empty() {
            return bad("a DNS name has no empty labels (no leading, trailing or double dots)");
        }
        if label.len() > 63 {
            return bad("a DNS label is at most 63 bytes");
        }
        if !label.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_') {
            return bad("only ASCII letters, digits, `-`, `_` and `.` are allowed");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return bad("a DNS label neither starts nor ends with `-`");
        }
    }
    if name.rsplit('.').next().is_some_and(|l| l.bytes().all(|c| c.is_ascii_digit())) {
        return bad("it looks like an IP address (give it with --ip)");
    }
    Ok(())
}

/// The first `-----BEGIN CERTIFICATE-----` block of a PEM file, with a
/// trailing newline.
fn first_certificate(pem: &str) -> Option<String> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let start = pem.find(BEGIN)?;
    let end = start + pem[start..].find(END)? + END.len();
    Some(format!("{}\n", &pem[start..end]))
}

fn refuse_existing(paths: &[PathBuf]) -> Result<(), CertError> {
    match paths.iter().find(|p| fs::symlink_metadata(p).is_ok()) {
        Some(p) => Err(CertError::FileExists(p.clone())),
        None => Ok(()),
    }
}

/// Writes `(path, contents, secret)` files into `dir` (created if need be);
/// secret ones get mode 0600. Without `force`, writes nothing if any exists.
fn write_files(
    dir: &Path,
    files: &[(PathBuf, String, bool)],
    force: bool,
) -> Result<Vec<PathBuf>, CertError> {
    fs::create_dir_all(dir).map_err(|e| CertError::Io(dir.to_owned(), e))?;
    if !force {
        let paths: Vec<PathBuf> = files.iter().map(|f| f.0.clone()).collect();
        refuse_existing(&paths)?;
    }
    for (path, contents, secret) in files {
        write_file(path, contents.as_bytes(), *secret, force)?;
    }
    Ok(files.iter().map(|f| f.0.clone()).collect())
}

/// Creates `path` afresh (so that a key file's mode is 0600 even when an
/// old file with a looser mode is replaced): with `force`, an existing file
/// is removed first; without, an existing file is an error.
fn write_file(path: &Path, contents: &[u8], secret: bool, force: bool) -> Result<(), CertError> {
    let io_err = |e| CertError::Io(path.to_owned(), e);
    if force {
        match fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err(e)),
            _ => {}
        }
    }
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if secret { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut f = opts.open(path).map_err(|e| match e.kind() {
        io::ErrorKind::AlreadyExists => CertError::FileExists(path.to_owned()),
        _ => io_err(e),
    })?;
    f.write_all(contents).and_then(|()| f.sync_all()).map_err(io_err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv6Addr;
    use x509_parser::certificate::X509Certificate;
    use x509_parser::extensions::GeneralName;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let p = std::env::temp_dir().join(format!("herald-cert-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&p);
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// The DER of every CERTIFICATE block in `pem`, in order.
    fn ders(pem: &str) -> Vec<Vec<u8>> {
        x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
            .map(|p| p.expect("PEM block"))
            .filter(|p| p.label == "CERTIFICATE")
            .map(|p| p.contents)
            .collect()
    }

    fn parse(der: &[u8]) -> X509Certificate<'_> {
        x509_parser::parse_x509_certificate(der).expect("X.509").1
    }

    fn dns_sans(c: &X509Certificate<'_>) -> Vec<String> {
        let san = c.subject_alternative_name().expect("one SAN extension").expect("a SAN extension");
        san.value
            .general_names
            .iter()
            .filter_map(|g| match g {
                GeneralName::DNSName(d) => Some(d.to_string()),
                _ => None,
            })
            .collect()
    }

    fn ip_sans(c: &X509Certificate<'_>) -> Vec<Vec<u8>> {
        let san = c.subject_alternative_name().unwrap().unwrap();
        san.value
            .general_names
            .iter()
            .filter_map(|g| match g {
                GeneralName::IPAddress(a) => Some(a.to_vec()),
                _ => None,
            })
            .collect()
    }

    #[cfg(unix)]
    fn mode(p: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn ca_issues_a_leaf_with_sans_usages_and_chain() {
        let ca = new_ca("test CA", 30).unwrap();
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----\n"));
        assert!(ca.key_pem().starts_with("-----BEGIN PRIVATE KEY-----\n"));
        let ips = ["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()];
        let dns = ["localhost".to_owned(), "n1.example".to_owned(), "n1".to_owned()];
        let leaf = ca.issue("n1", &dns, &ips, 90).unwrap();
        assert_eq!(leaf.name, "n1");
        assert!(leaf.key_pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        assert_eq!(leaf.cert_chain_pem.matches("-----BEGIN CERTIFICATE-----").count(), 2);
        assert!(leaf.cert_chain_pem.ends_with(&ca.cert_pem()), "leaf first, then the CA");

        let chain = ders(&leaf.cert_chain_pem);
        assert_eq!(chain.len(), 2);
        assert_eq!(chain[1], ders(&ca.cert_pem())[0]);
        let (c, ca_cert) = (parse(&chain[0]), parse(&chain[1]));
        assert_eq!(dns_sans(&c), ["n1", "localhost", "n1.example"], "NAME first, no duplicates");
        assert_eq!(ip_sans(&c), [vec![127, 0, 0, 1], Ipv6Addr::LOCALHOST.octets().to_vec()]);
        assert_eq!(c.subject().to_string(), "CN=n1");
        assert_eq!(c.issuer(), ca_cert.subject());
        assert!(!c.is_ca());
        let ku = c.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && !ku.key_cert_sign());
        let eku = c.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        assert!(c.validity().is_valid());
        c.verify_signature(Some(ca_cert.public_key())).expect("signed by the CA");

        assert!(ca_cert.is_ca());
        assert_eq!(ca_cert.subject().to_string(), "CN=test CA");
        assert!(ca_cert.key_usage().unwrap().unwrap().value.key_cert_sign());
        // ECDSA P-256 keys, signed with ECDSA-SHA256.
        assert_eq!(c.signature_algorithm.algorithm, x509_parser::oid_registry::OID_SIG_ECDSA_WITH_SHA256);
        assert_eq!(
            c.public_key().algorithm.parameters.as_ref().unwrap().as_oid().unwrap(),
            x509_parser::oid_registry::OID_EC_P256
        );
    }

    #[test]
    fn a_saved_ca_loads_back_and_signs_as_itself() {
        let dir = TempDir::new("roundtrip");
        let ca = new_ca(DEFAULT_CA_NAME, 30).unwrap();
        let written = ca.save(&dir.0, false).unwrap();
        assert_eq!(written, [dir.0.join("ca.pem"), dir.0.join("ca.key")]);

        let loaded = Ca::load(&dir.0).unwrap();
        assert_eq!(loaded.cert_pem(), ca.cert_pem());
        assert_eq!(loaded.key_pem(), ca.key_pem());
        // rcgen reads the CA certificate back as an issuer.
        let key = KeyPair::from_pem(&ca.key_pem()).unwrap();
        Issuer::from_ca_cert_pem(&ca.cert_pem(), key).unwrap();

        let leaf = loaded.issue("d1", &[], &[], 1).unwrap();
        let chain = ders(&leaf.cert_chain_pem);
        let (c, ca_cert) = (parse(&chain[0]), parse(&chain[1]));
        assert_eq!(c.issuer().to_string(), "CN=herald dev CA");
        c.verify_signature(Some(ca_cert.public_key())).unwrap();
        let aki = c
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                x509_parser::extensions::ParsedExtension::AuthorityKeyIdentifier(a) => {
                    a.key_identifier.clone()
                }
                _ => None,
            })
            .expect("authority key identifier");
        let ski = ca_cert
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(s) => Some(s.clone()),
                _ => None,
            })
            .expect("subject key identifier");
        assert_eq!(aki.0, ski.0);
        assert_eq!(dns_sans(&c), ["d1"]);
    }

    #[test]
    fn load_refuses_a_foreign_key_a_leaf_and_missing_files() {
        let dir = TempDir::new("badca");
        assert!(matches!(Ca::load(&dir.0), Err(CertError::Io(..))));
        let a = new_ca("a", 30).unwrap();
        let b = new_ca("b", 30).unwrap();
        a.save(&dir.0, false).unwrap();
        fs::write(dir.0.join("ca.key"), b.key_pem()).unwrap();
        match Ca::load(&dir.0) {
            Err(CertError::BadCa(p, why)) => {
                assert_eq!(p, dir.0.join("ca.key"));
                assert!(why.contains("does not belong"), "{why}");
            }
            other => panic!("{other:?}"),
        }
        let leaf = a.issue("n1", &[], &[], 1).unwrap();
        fs::write(dir.0.join("ca.pem"), &leaf.cert_chain_pem).unwrap();
        fs::write(dir.0.join("ca.key"), &leaf.key_pem).unwrap();
        assert!(matches!(Ca::load(&dir.0), Err(CertError::BadCa(..))));
        fs::write(dir.0.join("ca.pem"), "not a certificate\n").unwrap();
        assert!(matches!(Ca::load(&dir.0), Err(CertError::BadCa(..))));
    }

    #[test]
    fn keys_are_written_0600_and_nothing_is_overwritten_without_force() {
        let dir = TempDir::new("files");
        let ca = new_ca("files CA", 30).unwrap();
        ca.save(&dir.0, false).unwrap();
        let leaf = ca.issue("n1", &[], &[], 30).unwrap();
        let written = leaf.save(&dir.0, false).unwrap();
        assert_eq!(written, [dir.0.join("n1.pem"), dir.0.join("n1.key")]);
        #[cfg(unix)]
        {
            assert_eq!(mode(&dir.0.join("ca.key")), 0o600);
            assert_eq!(mode(&dir.0.join("n1.key")), 0o600);
            assert_eq!(mode(&dir.0.join("ca.pem")), 0o644);
            assert_eq!(mode(&dir.0.join("n1.pem")), 0o644);
        }
        assert_eq!(fs::read_to_string(dir.0.join("n1.pem")).unwrap(), leaf.cert_chain_pem);

        let other = new_ca("other CA", 30).unwrap();
        match other.save(&dir.0, false) {
            Err(CertError::FileExists(p)) => assert_eq!(p, dir.0.join("ca.pem")),
            r => panic!("{r:?}"),
        }
        // Only the key exists: still nothing is written.
        fs::remove_file(dir.0.join("ca.pem")).unwrap();
        assert!(matches!(other.save(&dir.0, false), Err(CertError::FileExists(_))));
        assert!(!dir.0.join("ca.pem").exists());
        assert!(matches!(leaf.save(&dir.0, false), Err(CertError::FileExists(_))));
        assert_eq!(fs::read_to_string(dir.0.join("ca.key")).unwrap(), ca.key_pem());

        // With force: replaced, and a loosened key file is 0600 again.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(dir.0.join("ca.key"), fs::Permissions::from_mode(0o644)).unwrap();
        }
        other.save(&dir.0, true).unwrap();
        assert_eq!(fs::read_to_string(dir.0.join("ca.key")).unwrap(), other.key_pem());
        #[cfg(unix)]
        assert_eq!(mode(&dir.0.join("ca.key")), 0o600);
        assert_eq!(Ca::load(&dir.0).unwrap().cert_pem(), other.cert_pem());
    }

    #[test]
    fn an_expired_certificate_can_be_made_for_tests() {
        let ca = new_ca("expiry CA", 30).unwrap();
        let day = Duration::from_secs(86_400);
        let now = SystemTime::now();
        let expired = Validity { not_before: now - 2 * day, not_after: now - day };
        let leaf = ca.issue_with_validity("n1", &[], &[], expired).unwrap();
        let chain = ders(&leaf.cert_chain_pem);
        let c = parse(&chain[0]);
        assert!(!c.validity().is_valid());
        assert!(c.validity().time_to_expiration().is_none());
        c.verify_signature(Some(parse(&chain[1]).public_key())).unwrap();

        let dir = TempDir::new("expired");
        new_ca_with_validity("old CA", expired).unwrap().save(&dir.0, false).unwrap();
        match Ca::load(&dir.0) {
            Err(CertError::BadCa(_, why)) => assert!(why.contains("make a new CA"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn names_must_be_dns_names_and_file_names() {
        let ca = new_ca("names CA", 1).unwrap();
        for bad in ["", "../n1", "a/b", ".n1", "n1.", "a..b", "-n1", "n 1", "1.2.3.4", "nü"] {
            assert!(matches!(ca.issue(bad, &[], &[], 1), Err(CertError::BadName(..))), "{bad:?}");
        }
        assert!(matches!(ca.issue("n1", &["x/y".to_owned()], &[], 1), Err(CertError::BadName(..))));
        for good in ["n1", "node-2.example.com", "_n3", "N4"] {
            ca.issue(good, &[], &[], 1).unwrap();
        }
        assert!(matches!(new_ca(" ", 1), Err(CertError::BadName(..))));
    }

    #[test]
    fn the_dev_set_has_a_ca_and_a_certificate_per_server() {
        let dir = TempDir::new("dev");
        let nodes = ["n1".to_owned(), "n2".to_owned()];
        let decision = ["d1".to_owned(), String::new()];
        let written = write_dev_set(&dir.0, &nodes, &decision, false).unwrap();
        let names: Vec<String> =
            written.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["ca.pem", "ca.key", "n1.pem", "n1.key", "n2.pem", "n2.key", "d1.pem", "d1.key"]);
        let ca = Ca::load(&dir.0).unwrap();
        for n in ["n1", "n2", "d1"] {
            let pem = fs::read_to_string(dir.0.join(format!("{n}.pem"))).unwrap();
            assert!(pem.ends_with(&ca.cert_pem()));
            let chain = ders(&pem);
            let c = parse(&chain[0]);
            assert_eq!(dns_sans(&c), [n, "localhost"]);
            assert_eq!(ip_sans(&c), [vec![127, 0, 0, 1]]);
            c.verify_signature(Some(parse(&chain[1]).public_key())).unwrap();
            #[cfg(unix)]
            assert_eq!(mode(&dir.0.join(format!("{n}.key"))), 0o600);
        }
        let before = fs::read_to_string(dir.0.join("ca.key")).unwrap();
        assert!(matches!(write_dev_set(&dir.0, &nodes, &[], false), Err(CertError::FileExists(_))));
        assert_eq!(fs::read_to_string(dir.0.join("ca.key")).unwrap(), before);
        write_dev_set(&dir.0, &nodes, &[], true).unwrap();
        assert_ne!(fs::read_to_string(dir.0.join("ca.key")).unwrap(), before);

        let twice = ["n1".to_owned(), "N1".to_owned()];
        assert!(matches!(write_dev_set(&dir.0, &twice, &[], true), Err(CertError::BadName(..))));
        assert!(matches!(write_dev_set(&dir.0, &["ca".to_owned()], &[], true), Err(CertError::BadName(..))));

        let hint = dev_hint(&dir.0, &nodes);
        assert!(hint.contains(&format!("--tls-cert {}", dir.0.join("n1.pem").display())), "{hint}");
        assert!(hint.contains(&format!("--tls-key {}", dir.0.join("n1.key").display())), "{hint}");
        assert!(hint.contains(&format!("--tls-ca {}", dir.0.join("ca.pem").display())), "{hint}");
    }
}
