//! Keys that never leave a hardware token: signing through PKCS#11.
//!
//! A key is named by an RFC 7512 URI, for example
//! `pkcs11:token=atom;object=release?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/atom/pin`.
//! Understood: `token` (label), `object` (key label), `id` (percent-encoded bytes) in the
//! path; `module-path`, `pin-value` and `pin-source=file:PATH` in the query. Without a
//! module path `ATOM_PKCS11_MODULE` names it; without a PIN, `ATOM_PKCS11_PIN`, else it is
//! asked on the terminal. The token must support CKM_EDDSA over Ed25519 (SoftHSM 2.5+,
//! YubiHSM 2, Nitrokey HSM 2, most cloud HSMs).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result, bail};
use atom_dist::signature::{SignError, Signer};
use atom_dist::{KeyId, PublicKey};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use percent_encoding::percent_decode_str;

/// DER PrintableString "edwards25519": the curve name every Ed25519 token accepts.
const EDWARDS25519: &[u8] = b"\x13\x0cedwards25519";

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Uri {
    pub token: Option<String>,
    pub object: Option<String>,
    pub id: Option<Vec<u8>>,
    pub module: Option<PathBuf>,
    pub pin_value: Option<String>,
    pub pin_source: Option<PathBuf>,
}

pub fn is_uri(spec: &str) -> bool {
    spec.starts_with("pkcs11:")
}

/// The URI without a `pin-value`, for messages: a PIN is never printed.
pub fn redact(spec: &str) -> String {
    let Some((path, query)) = spec.split_once('?') else {
        return spec.to_owned();
    };
    let kept: Vec<&str> = query
        .split('&')
        .map(|a| {
            if a.starts_with("pin-value=") {
                "pin-value=(hidden)"
            } else {
                a
            }
        })
        .collect();
    format!("{path}?{}", kept.join("&"))
}

/// One initialized module per library for the whole process: a second C_Initialize of the
/// same library fails (CKR_CRYPTOKI_ALREADY_INITIALIZED), and a publish may open a release
/// and a freshness key on one token.
fn module(path: &Path) -> Result<Pkcs11> {
    static MODULES: Mutex<Vec<(PathBuf, Pkcs11)>> = Mutex::new(Vec::new());
    let mut modules = MODULES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, m)) = modules.iter().find(|(p, _)| p == path) {
        return Ok(m.clone());
    }
    let pkcs11 = Pkcs11::new(path).with_context(|| format!("cannot load PKCS#11 module {}", path.display()))?;
    pkcs11
        .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .context("C_Initialize")?;
    modules.push((path.to_owned(), pkcs11.clone()));
    Ok(pkcs11)
}

impl Uri {
    pub fn parse(spec: &str) -> Result<Uri> {
        let rest = spec
            .strip_prefix("pkcs11:")
            .context("a PKCS#11 URI starts with pkcs11:")?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let decode = |v: &str| -> Result<Vec<u8>> { Ok(percent_decode_str(v).collect()) };
        let text = |v: &str| -> Result<String> {
            String::from_utf8(decode(v)?).with_context(|| format!("{v:?} is not UTF-8 once decoded"))
        };
        let mut uri = Uri::default();
        for attr in path.split(';').filter(|a| !a.is_empty()) {
            let (k, v) = attr
                .split_once('=')
                .with_context(|| format!("{attr:?}: expected name=value"))?;
            match k {
                "token" => uri.token = Some(text(v)?),
                "object" => uri.object = Some(text(v)?),
                "id" => uri.id = Some(decode(v)?),
                // Narrowing attributes we need not act on.
                "type"
                | "manufacturer"
                | "model"
                | "serial"
                | "library-manufacturer"
                | "library-description"
                | "library-version"
                | "slot-description"
                | "slot-manufacturer"
                | "slot-id" => {}
                other => bail!("PKCS#11 URI attribute {other:?} is not understood"),
            }
        }
        for attr in query.split('&').filter(|a| !a.is_empty()) {
            let (k, v) = attr
                .split_once('=')
                .with_context(|| format!("{attr:?}: expected name=value"))?;
            match k {
                "module-path" => uri.module = Some(PathBuf::from(text(v)?)),
                "pin-value" => uri.pin_value = Some(text(v)?),
                "pin-source" => {
                    let v = text(v)?;
                    let path = v
                        .strip_prefix("file:")
                        .context("pin-source must be file:PATH")?
                        .trim_start_matches("//");
                    uri.pin_source = Some(PathBuf::from(path));
                }
                other => bail!("PKCS#11 URI query attribute {other:?} is not understood"),
            }
        }
        if uri.object.is_none() && uri.id.is_none() {
            bail!("the PKCS#11 URI names no key: give object=LABEL or id=%01");
        }
        Ok(uri)
    }

    fn module(&self) -> Result<PathBuf> {
        self.module
            .clone()
            .or_else(|| std::env::var_os("ATOM_PKCS11_MODULE").map(PathBuf::from))
            .context("no PKCS#11 module: add ?module-path=/usr/lib/…/libXYZ.so to the URI or set ATOM_PKCS11_MODULE")
    }

    fn pin(&self) -> Result<AuthPin> {
        if let Some(v) = &self.pin_value {
            tracing::warn!("pin-value= puts the PIN on command lines others can read (ps); prefer pin-source=file:");
            return Ok(AuthPin::from(v.clone()));
        }
        if let Some(p) = &self.pin_source {
            crate::signing::check_secret_file(p, "PIN file")?;
            let text = std::fs::read_to_string(p).with_context(|| format!("cannot read PIN file {}", p.display()))?;
            return Ok(AuthPin::from(text.trim_end_matches(['\n', '\r']).to_owned()));
        }
        if let Ok(v) = std::env::var("ATOM_PKCS11_PIN") {
            return Ok(AuthPin::from(v));
        }
        let prompt = format!("PIN of token {:?}: ", self.token.as_deref().unwrap_or("?"));
        crate::signing::ask_secret(&prompt).map(AuthPin::from)
    }

    fn key_template(&self, class: ObjectClass) -> Vec<Attribute> {
        let mut t = vec![Attribute::Class(class), Attribute::KeyType(KeyType::EC_EDWARDS)];
        if let Some(o) = &self.object {
            t.push(Attribute::Label(o.as_bytes().to_vec()));
        }
        if let Some(id) = &self.id {
            t.push(Attribute::Id(id.clone()));
        }
        t
    }
}

/// A logged-in session on the token the URI names.
fn open(uri: &Uri) -> Result<Session> {
    let module_path = uri.module()?;
    let pkcs11 = module(&module_path)?;
    let mut found = None;
    let mut labels = Vec::new();
    for slot in pkcs11.get_slots_with_initialized_token().context("listing tokens")? {
        let info = pkcs11.get_token_info(slot).context("C_GetTokenInfo")?;
        let label = info.label().trim_end().to_owned();
        if uri.token.as_deref().is_none_or(|t| t == label) {
            found = Some(slot);
            break;
        }
        labels.push(label);
    }
    let slot = found.with_context(|| {
        format!(
            "no token {:?} in {} (tokens: {labels:?})",
            uri.token.as_deref().unwrap_or("(any)"),
            module_path.display()
        )
    })?;
    let session = pkcs11.open_rw_session(slot).context("C_OpenSession")?;
    match session.login(UserType::User, Some(&uri.pin()?)) {
        // Login is per token and application: a second key on the same token is in already.
        Ok(()) | Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::UserAlreadyLoggedIn, _)) => Ok(session),
        Err(e) => Err(e).context("cannot log in to the token (wrong PIN?)"),
    }
}

fn find_one(session: &Session, template: &[Attribute], what: &str) -> Result<ObjectHandle> {
    let found = session.find_objects(template).context("C_FindObjects")?;
    match found.as_slice() {
        [one] => Ok(*one),
        [] => bail!("no Ed25519 {what} with that label/id on the token"),
        many => bail!("{} Ed25519 {what}s match; narrow the URI with id=", many.len()),
    }
}

/// CKA_EC_POINT is a DER OCTET STRING of the 32 bytes on most tokens, the bare bytes on some.
fn public_from_point(point: &[u8]) -> Result<PublicKey> {
    let raw = match point {
        [0x04, 0x20, rest @ ..] if rest.len() == 32 => rest,
        raw if raw.len() == 32 => raw,
        _ => bail!("the token's public key is not an Ed25519 point ({} bytes)", point.len()),
    };
    PublicKey::from_bytes(raw.try_into().expect("32 bytes")).map_err(|e| anyhow::anyhow!(e))
}

fn read_public(session: &Session, handle: ObjectHandle) -> Result<PublicKey> {
    let attrs = session
        .get_attributes(handle, &[AttributeType::EcPoint])
        .context("reading the public key")?;
    match attrs.as_slice() {
        [Attribute::EcPoint(p)] => public_from_point(p),
        _ => bail!("the token gave no CKA_EC_POINT for the public key"),
    }
}

pub struct Pkcs11Signer {
    session: Session,
    key: ObjectHandle,
    public: PublicKey,
}

impl Pkcs11Signer {
    pub fn open(spec: &str) -> Result<Self> {
        let uri = Uri::parse(spec)?;
        let session = open(&uri)?;
        let key = find_one(&session, &uri.key_template(ObjectClass::PRIVATE_KEY), "private key")?;
        let pub_handle = find_one(&session, &uri.key_template(ObjectClass::PUBLIC_KEY), "public key")?;
        let public = read_public(&session, pub_handle)?;
        let signer = Pkcs11Signer { session, key, public };
        // A token that signs with another key than its public object says would make
        // signatures no host accepts: find out now, not at the hosts.
        let probe = b"atom: PKCS#11 key self-test";
        let sig = signer.sign_message(probe)?;
        atom_dist::signature::check_raw(&signer.public, probe, &sig)
            .map_err(|_| anyhow::anyhow!("the token's private key does not match its public key object"))?;
        Ok(signer)
    }

    /// Generates an Ed25519 key pair inside the token (the private half never leaves it).
    pub fn generate(spec: &str) -> Result<PublicKey> {
        let uri = Uri::parse(spec)?;
        let session = open(&uri)?;
        if !session
            .find_objects(&uri.key_template(ObjectClass::PRIVATE_KEY))
            .context("C_FindObjects")?
            .is_empty()
        {
            bail!("the token already has a key with that label/id; refusing to add a second");
        }
        let mut naming = Vec::new();
        if let Some(o) = &uri.object {
            naming.push(Attribute::Label(o.as_bytes().to_vec()));
        }
        if let Some(id) = &uri.id {
            naming.push(Attribute::Id(id.clone()));
        }
        let mut public_t = vec![
            Attribute::Token(true),
            Attribute::Verify(true),
            Attribute::EcParams(EDWARDS25519.to_vec()),
        ];
        public_t.extend(naming.iter().cloned());
        let mut private_t = vec![
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
        ];
        private_t.extend(naming);
        let (public, _) = session
            .generate_key_pair(&Mechanism::EccEdwardsKeyPairGen, &public_t, &private_t)
            .context("the token cannot generate an Ed25519 key pair (C_GenerateKeyPair)")?;
        read_public(&session, public)
    }
}

impl Signer for Pkcs11Signer {
    fn key_id(&self) -> KeyId {
        self.public.id().clone()
    }

    fn public_key(&self) -> PublicKey {
        self.public.clone()
    }

    fn sign_message(&self, message: &[u8]) -> Result<[u8; 64], SignError> {
        let err = |reason: String| SignError {
            key: self.public.id().clone(),
            reason,
        };
        let mechanism = Mechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Pure));
        let sig = self
            .session
            .sign(&mechanism, self.key, message)
            .map_err(|e| err(format!("C_Sign: {e}")))?;
        sig.try_into()
            .map_err(|s: Vec<u8>| err(format!("the token returned a {}-byte signature", s.len())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_parse_and_refuse_what_they_cannot_mean() {
        let u = Uri::parse(
            "pkcs11:token=my%20hsm;object=release;id=%01%02?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/pin",
        )
        .unwrap();
        assert_eq!(u.token.as_deref(), Some("my hsm"));
        assert_eq!(u.object.as_deref(), Some("release"));
        assert_eq!(u.id, Some(vec![1, 2]));
        assert_eq!(u.module, Some(PathBuf::from("/usr/lib/softhsm/libsofthsm2.so")));
        assert_eq!(u.pin_source, Some(PathBuf::from("/etc/pin")));
        for bad in [
            "pkcs11:token=x",
            "pkcs11:object=k;colour=red",
            "pkcs11:object=k?pin-source=http://x",
            "file:/x",
        ] {
            assert!(Uri::parse(bad).is_err(), "{bad}");
        }
        assert!(public_from_point(&[0x04, 0x20]).is_err());
        assert_eq!(
            redact("pkcs11:object=k?module-path=/m.so&pin-value=1234"),
            "pkcs11:object=k?module-path=/m.so&pin-value=(hidden)"
        );
    }
}
