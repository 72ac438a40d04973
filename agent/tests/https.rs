//! HTTPS repositories: the agent trusts the CAs of `tls_ca` and nothing else, and refuses a
//! CA file that others could change or that holds no certificate. Real atom-dist serving
//! TLS on loopback with certificates made by openssl.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

use common::{Env, failed};

fn openssl(args: &[&str], dir: &Path) {
    let st = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stderr(Stdio::null())
        .status()
        .expect("openssl is needed for the HTTPS test");
    assert!(st.success(), "openssl {args:?}");
}

/// A self-signed CA `name.pem` / `name.key` in `dir`.
fn make_ca(dir: &Path, name: &str) {
    let (pem, key) = (format!("{name}.pem"), format!("{name}.key"));
    openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
            "-keyout",
            &key,
            "-out",
            &pem,
        ],
        dir,
    );
}

/// A server certificate for 127.0.0.1 issued by `ca`: `server.pem` / `server.key`.
fn make_server_cert(dir: &Path, ca: &str) {
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            "/CN=atom-dist",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
        dir,
    );
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "server.ext",
            "-out",
            "server.pem",
        ],
        dir,
    );
}

#[test]
fn https_repository_is_trusted_only_through_the_configured_ca() {
    let mut env = Env::new();
    let pki = env.path("pki");
    std::fs::create_dir(&pki).unwrap();
    make_ca(&pki, "fleet-ca");
    make_ca(&pki, "other-ca");
    make_server_cert(&pki, "fleet-ca");
    env.stop_server();
    env.start_server_with(&[
        "--tls-cert".as_ref(),
        pki.join("server.pem").as_os_str(),
        "--tls-key".as_ref(),
        pki.join("server.key").as_os_str(),
    ]);
    let url = env.url.clone();
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    let pinned = |ca: &str| format!("tls_ca = \"{}\"\n", pki.join(ca).display());
    let untouched = |env: &Env| {
        assert_eq!(env.flags(2), (1, 0, 1), "the running slot A is untouched");
        assert_eq!(env.flags(3).0, 0, "B is not made bootable");
    };

    // The system's CA store does not know the fleet CA; nor does another pinned CA.
    env.write_config(&[&url], "");
    let err = failed(&env.agent(&["now"]), 1, "cannot fetch the manifest");
    assert!(
        err.contains("invalid peer certificate: UnknownIssuer"),
        "says why: {err}"
    );
    untouched(&env);
    env.write_config(&[&url], &pinned("other-ca.pem"));
    let err = failed(&env.agent(&["now"]), 1, "cannot fetch the manifest");
    assert!(
        err.contains("invalid peer certificate: UnknownIssuer"),
        "says why: {err}"
    );
    untouched(&env);

    // A CA file others could write, or one without a certificate: refused before any request.
    let ca = pki.join("fleet-ca.pem");
    std::fs::set_permissions(&ca, std::fs::Permissions::from_mode(0o664)).unwrap();
    env.write_config(&[&url], &pinned("fleet-ca.pem"));
    failed(&env.agent(&["now"]), 6, "TLS CA file");
    std::fs::set_permissions(&ca, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(pki.join("empty.pem"), "not a certificate\n").unwrap();
    env.write_config(&[&url], &pinned("empty.pem"));
    failed(&env.agent(&["now"]), 1, "holds no PEM certificate");
    env.write_config(&[&url], &pinned("missing.pem"));
    failed(&env.agent(&["now"]), 1, "cannot read TLS CA file");
    untouched(&env);

    // The fleet CA pinned: the update goes through over HTTPS, here by the rsync endpoint
    // (the signature goes up through TLS too).
    env.write_config(&[&url], &format!("{}routes = [\"rsync\"]\n", pinned("fleet-ca.pem")));
    let out = env.now_ok();
    assert!(
        out.contains("staged 2.0.0 in slot B") && out.contains("via rsync-delta"),
        "{out}"
    );
    assert!(env.slot_holds("B", "v2.img"));
}

/// An HTTPS mirror that redirects to plain HTTP (a misconfigured CDN, or an attacker who
/// can answer on the HTTPS name): the redirect is refused, even though the plain server
/// would serve a validly signed repository.
#[test]
fn a_redirect_from_https_to_plain_http_is_refused() {
    let env = Env::new();
    let pki = env.path("pki");
    std::fs::create_dir(&pki).unwrap();
    make_ca(&pki, "fleet-ca");
    make_server_cert(&pki, "fleet-ca");
    let script = r#"
import http.server, ssl, sys
target, cert, key = sys.argv[1:4]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(302)
        self.send_header("Location", target + self.path)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *a):
        pass
srv = http.server.HTTPServer(("127.0.0.1", 0), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print(srv.server_address[1], flush=True)
srv.serve_forever()
"#;
    let mut redirector = Command::new("python3")
        .args(["-c", script, &env.url])
        .arg(pki.join("server.pem"))
        .arg(pki.join("server.key"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 is needed for the redirect test");
    let mut port = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(redirector.stdout.take().unwrap()),
        &mut port,
    )
    .unwrap();
    let https = format!("https://127.0.0.1:{}", port.trim());
    env.write_config(
        &[&https],
        &format!("tls_ca = \"{}\"\n", pki.join("fleet-ca.pem").display()),
    );
    let out = env.agent(&["now"]);
    let _ = redirector.kill();
    let _ = redirector.wait();
    let err = failed(&out, 1, "cannot fetch the manifest");
    assert!(err.contains("refusing a redirect from HTTPS to plain HTTP"), "{err}");
    assert_eq!(env.flags(3).0, 0, "nothing staged");
}
