//! VM tier, run inside `guest::vm_up_verify_reprovision_destroy` on its already-running guest (no boot of its own):
//! `images = "auto"` against a REAL registry, Debian's `docker-registry` (Distribution 2.8) on the host's
//! 127.0.0.1 (the guest reaches it at 10.0.2.2 through QEMU's user network), with TLS from a CA this test makes
//! (openssl CLI) and basic auth (htpasswd -B), used as the lab's one private registry (`registry_proxies` for
//! docker.io and gcr.io, also named in `registry_mirrors`). The registry is filled from the guest with the images
//! registry mode names: Prometheus, Alertmanager and node exporter are the debian-mode images the guest built,
//! re-tagged (plus a `wget` shim: registry mode's healthchecks use wget); Grafana, cAdvisor and the demo app's
//! Python base are STAND-INS built FROM the debian base image (a tiny HTTP server answering the health endpoints
//! and /metrics; a Python with pip). The demo app's pinned packages come from a local index: `pip download` on the
//! host into a directory served over HTTP on 127.0.0.1.
//!
//! Cases: a wrong password (a clear error naming the registry, the secret never printed); the right one (all six
//! services healthy, the table says registry mode); the registry stopped (`auto` falls back to debian mode within
//! its deadline and says so).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::{free_port, wait_until, Proc, Run, Test};

const USER: &str = "lab";
const PASSWORD: &str = "Reg-pass-7f3c9d-never-printed";
const WRONG: &str = "Wrong-pass-41b2e8-never-printed";

/// Images the registry gets, as registry mode names them (repository paths under the proxy prefix), and what
/// each is made from in the guest.
const IMAGES: [(&str, &str); 6] = [
    ("docker.io/prom/prometheus:v2.53.2", "retag provisioner-lab/prometheus:debian"),
    ("docker.io/prom/alertmanager:v0.27.0", "retag provisioner-lab/alertmanager:debian"),
    ("docker.io/prom/node-exporter:v1.8.2", "retag provisioner-lab/node-exporter:debian"),
    ("docker.io/grafana/grafana:11.2.2", "stand-in grafana (answers /api/health on 3000)"),
    ("gcr.io/cadvisor/cadvisor:v0.49.1", "stand-in cadvisor (answers /healthz and /metrics on 8080)"),
    ("docker.io/library/python:3.12.7-slim-bookworm", "stand-in python (Debian's python3 + pip)"),
];

fn sh(cmd: &mut Command, what: &str) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and a server certificate for 10.0.2.2 and 127.0.0.1, made with the openssl CLI.
fn make_tls(dir: &Path) {
    let o = |args: &[&str], what: &str| sh(Command::new("openssl").current_dir(dir).args(args), what);
    o(
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=provisioner test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ],
        "openssl CA",
    );
    o(
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=10.0.2.2",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
        "openssl CSR",
    );
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:10.0.2.2,IP:127.0.0.1\n").unwrap();
    o(
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            "server.crt",
        ],
        "openssl sign",
    );
}

/// `docker-registry serve` on 127.0.0.1:port with TLS and htpasswd auth, storage under `dir`.
fn start_registry(dir: &Path, port: u16) -> Proc {
    let conf = dir.join("registry.yml");
    std::fs::write(
        &conf,
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {root}\n\
             http:\n  addr: 127.0.0.1:{port}\n  tls:\n    certificate: {d}/server.crt\n    key: {d}/server.key\n\
             auth:\n  htpasswd:\n    realm: provisioner-test\n    path: {d}/htpasswd\n",
            root = dir.join("storage").display(),
            d = dir.display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new("docker-registry");
    cmd.arg("serve").arg(&conf);
    let p = Proc::spawn("docker-registry", cmd, dir.join(format!("registry-{port}.log")));
    wait_until(Duration::from_secs(30), "the registry listening", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    p
}

/// The demo app's pinned packages (and pip itself, for the Python stand-in) for the guest's Python 3.11, as a
/// simple index: `simple/<project>/` directories served by Python's HTTP server (its listings are the index).
fn start_pip_index(dir: &Path, requirements: &Path, port: u16) -> Proc {
    let wheels = dir.join("wheels");
    sh(
        Command::new("pip")
            .args([
                "download",
                "-q",
                "--only-binary=:all:",
                "--python-version",
                "3.11",
                "--implementation",
                "cp",
                "--abi",
                "cp311",
                "--platform",
                "manylinux2014_x86_64",
                "-d",
            ])
            .arg(&wheels)
            .arg("-r")
            .arg(requirements)
            .arg("pip"),
        "pip download (the host reaches PyPI)",
    );
    for e in std::fs::read_dir(&wheels).unwrap().flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        let project = file.split('-').next().unwrap().to_ascii_lowercase().replace(['_', '.'], "-");
        let d = dir.join("index/simple").join(project);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(e.path(), d.join(&file)).unwrap();
    }
    let mut cmd = Command::new("python3");
    cmd.args(["-m", "http.server", &port.to_string(), "--bind", "127.0.0.1", "--directory"])
        .arg(dir.join("index"));
    let p = Proc::spawn("pip index", cmd, dir.join("pip-index.log"));
    wait_until(Duration::from_secs(30), "the package index listening", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    p
}

/// Pushes the debian-mode base tarball (cached on the host) to the registry as `provisioner-test/base:bookworm`,
/// from the host: one gzip layer (its diff id is the tarball's sha256, as `docker import` made it in the guest) and
/// a config. A push of that 300 MB layer from the TCG guest (gzip in the emulated CPU) runs at ~130 KB/s; pulled
/// once by the guest, its layer is known to the registry and every later push mounts it instead.
const PUSH_BASE: &str = r#"
import base64, gzip, hashlib, json, os, ssl, sys, tempfile, urllib.request
reg, ca, user, pw, tarball, name, tag = sys.argv[1:]
ctx = ssl.create_default_context(cafile=ca)
auth = "Basic " + base64.b64encode(("%s:%s" % (user, pw)).encode()).decode()
def call(method, url, data=None, headers=None):
    if not url.startswith("http"):
        url = "https://%s%s" % (reg, url)
    h = {"Authorization": auth}
    h.update(headers or {})
    return urllib.request.urlopen(urllib.request.Request(url, data=data, method=method, headers=h), context=ctx)
def blob(path, digest, size):
    loc = call("POST", "/v2/%s/blobs/uploads/" % name).headers["Location"]
    loc += ("&" if "?" in loc else "?") + "digest=" + digest
    with open(path, "rb") as f:
        call("PUT", loc, data=f, headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"})
raw, packed = hashlib.sha256(), hashlib.sha256()
gz = tempfile.NamedTemporaryFile(delete=False, dir=os.path.dirname(ca))
with open(tarball, "rb") as src, gzip.GzipFile(fileobj=gz, mode="wb", compresslevel=1, mtime=0) as z:
    for chunk in iter(lambda: src.read(1 << 20), b""):
        raw.update(chunk)
        z.write(chunk)
gz.close()
with open(gz.name, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
        packed.update(chunk)
layer = ("sha256:" + packed.hexdigest(), os.path.getsize(gz.name))
blob(gz.name, *layer)
config = json.dumps({"architecture": "amd64", "os": "linux",
    "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
    "rootfs": {"type": "layers", "diff_ids": ["sha256:" + raw.hexdigest()]},
    "history": [{"created_by": "provisioner test: the debian-mode base rootfs"}]}).encode()
cpath = gz.name + ".config"
open(cpath, "wb").write(config)
cdesc = ("sha256:" + hashlib.sha256(config).hexdigest(), len(config))
blob(cpath, *cdesc)
manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
    "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": cdesc[0], "size": cdesc[1]},
    "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "digest": layer[0],
                "size": layer[1]}]}).encode()
call("PUT", "/v2/%s/manifests/%s" % (name, tag), data=manifest,
     headers={"Content-Type": "application/vnd.docker.distribution.manifest.v2+json"})
os.unlink(gz.name); os.unlink(cpath)
print("pushed base", raw.hexdigest())
"#;

/// The guest-side script that fills the registry (its files arrive as a tar on stdin).
const FILL: &str = r#"#!/bin/sh
set -eu
R="$1"; PIP="$2"; cd "$(dirname "$0")"
sudo -n mkdir -p "/etc/docker/certs.d/$R"
sudo -n install -m 0644 ca.pem "/etc/docker/certs.d/$R/ca.crt"
sudo -n docker login --username lab --password-stdin "$R" < password >/dev/null
rm -f password
# The base layer once, pulled (see PUSH_BASE): every push below then mounts it instead of uploading it.
sudo -n docker pull -q "$R/provisioner-test/base:bookworm" >/dev/null
echo "pulled base $(sudo -n docker image inspect -f '{{json .RootFS.Layers}}' "$R/provisioner-test/base:bookworm")"
echo "local base $(sudo -n docker image inspect -f '{{json .RootFS.Layers}}' provisioner-base:bookworm)"
build() { sudo -n docker build -q -f "$1" -t "$R/$2" . >/dev/null; sudo -n docker push -q "$R/$2" >/dev/null; echo "pushed $2"; }
for s in prometheus:prom/prometheus:v2.53.2 alertmanager:prom/alertmanager:v0.27.0 node-exporter:prom/node-exporter:v1.8.2; do
  svc=${s%%:*}; img=${s#*:}
  printf 'FROM provisioner-lab/%s:debian\nUSER root\nCOPY wget /usr/local/bin/wget\n' "$svc" > "Dockerfile.$svc"
  # Back to the user the debian-mode image runs as.
  u=$(sudo -n docker image inspect -f '{{.Config.User}}' "provisioner-lab/$svc:debian")
  [ -n "$u" ] && printf 'USER %s\n' "$u" >> "Dockerfile.$svc"
  build "Dockerfile.$svc" "docker.io/$img"
done
build Dockerfile.grafana docker.io/grafana/grafana:11.2.2
build Dockerfile.cadvisor gcr.io/cadvisor/cadvisor:v0.49.1
sed -i "s|@PIP@|$PIP|" Dockerfile.python
build Dockerfile.python docker.io/library/python:3.12.7-slim-bookworm
sudo -n docker logout "$R" >/dev/null
"#;

const WGET: &str =
    "#!/bin/sh\n# stand-in wget for healthchecks: the last argument is the URL\nfor a; do u=$a; done\n\
                    exec curl -fsS -o /dev/null \"$u\"\n";

const STANDIN: &str = r#"# STAND-IN for Grafana / cAdvisor in the registry test: answers every GET with 200 (/metrics: one sample).
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"standin_up 1\n" if self.path.startswith("/metrics") else b'{"database": "ok"}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), H).serve_forever()
"#;

/// The files the fill script uses, as a tar.
fn fill_tar(ca_pem: &[u8]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |name: &str, data: &[u8], mode: u32| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_cksum();
        b.append_data(&mut h, name, data).unwrap();
    };
    add("fill.sh", FILL.as_bytes(), 0o755);
    add("wget", WGET.as_bytes(), 0o755);
    add("standin.py", STANDIN.as_bytes(), 0o644);
    add("ca.pem", ca_pem, 0o644);
    add("password", PASSWORD.as_bytes(), 0o600);
    add(
        "Dockerfile.grafana",
        b"# STAND-IN for grafana/grafana: /run.sh (the lab's entrypoint execs it) serves /api/health on 3000\n\
          FROM provisioner-base:bookworm\nCOPY wget /usr/local/bin/wget\nCOPY standin.py /standin.py\n\
          RUN printf '#!/bin/sh\\nexec python3 /standin.py 3000\\n' > /run.sh && chmod 755 /run.sh\n\
          CMD [\"/run.sh\"]\n",
        0o644,
    );
    add(
        "Dockerfile.cadvisor",
        b"# STAND-IN for cAdvisor: /healthz and /metrics on 8080 (the lab's flags are ignored)\n\
          FROM provisioner-base:bookworm\nCOPY wget /usr/local/bin/wget\nCOPY standin.py /standin.py\n\
          ENTRYPOINT [\"python3\", \"/standin.py\", \"8080\"]\n",
        0o644,
    );
    add(
        "Dockerfile.python",
        b"# STAND-IN for python:3.12.7-slim-bookworm: Debian's python3 with pip (from the local index) as `python`\n\
          FROM provisioner-base:bookworm\nENV PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore\n\
          RUN ln -s /usr/bin/python3 /usr/local/bin/python && f=$(curl -fsS @PIP@/simple/pip/ | \
          sed -n 's/.*href=\"\\(pip-[^\"]*\\.whl\\)\".*/\\1/p' | head -1) && curl -fsS -o /tmp/$f @PIP@/simple/pip/$f \
          && python3 /tmp/$f/pip install --no-index /tmp/$f && rm /tmp/$f\n",
        0o644,
    );
    b.into_inner().unwrap()
}

fn events(out: &str, kind: &str) -> Vec<serde_json::Value> {
    out.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == kind)
        .collect()
}

/// The three registry cases on the running lab in `dir` (debian mode so far). `run` runs the binary there.
pub fn registry_cases(dir: &Path, run: &dyn Fn(&[&str]) -> Run) {
    let started = Instant::now();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    make_tls(w);
    sh(Command::new("htpasswd").args(["-Bbc"]).arg(w.join("htpasswd")).args([USER, PASSWORD]), "htpasswd");
    let (port, pip_port) = loop {
        let (a, b) = (free_port(), free_port());
        if a != b {
            break (a, b);
        }
    };
    let registry = start_registry(w, port);
    let _index = start_pip_index(w, &dir.join("provision/demo-app/requirements.txt"), pip_port);
    let r = format!("10.0.2.2:{port}");
    let pip = format!("http://10.0.2.2:{pip_port}");

    // Fill the registry: the base layer from the host, the images from the guest.
    let cfg = provisioner::config::Config::from_bytes(
        &dir.join("box-config.toml"),
        &std::fs::read(dir.join("box-config.toml")).unwrap(),
    )
    .unwrap();
    let base = provisioner::guest::images::BaseImage::for_config(&cfg, &provisioner::lab::PROFILE);
    let tarball = crate::support::cache_dir().join("images").join(base.tarball().file_name().unwrap());
    assert!(
        tarball.is_file(),
        "the debian-mode base tarball {} is cached (the lab above was built from it)",
        tarball.display()
    );
    let t = Instant::now();
    sh(
        Command::new("python3")
            .arg("-c")
            .arg(PUSH_BASE)
            .args([format!("127.0.0.1:{port}"), w.join("ca.pem").display().to_string(), USER.to_string()])
            .arg(PASSWORD)
            .arg(&tarball)
            .args(["provisioner-test/base", "bookworm"]),
        "push the base layer from the host",
    );
    eprintln!("base layer pushed from the host in {:?}", t.elapsed());
    let ca_pem = std::fs::read(w.join("ca.pem")).unwrap();
    let fill = Test::new()
        .cwd(dir)
        .args(["ssh", "-c", &format!("d=$(mktemp -d) && tar -x -C \"$d\" && sh \"$d/fill.sh\" {r} {pip}; rc=$?; rm -rf \"$d\"; exit $rc")])
        .stdin(fill_tar(&ca_pem))
        .run()
        .success();
    for (image, made) in IMAGES {
        assert!(
            fill.stdout().contains(&format!("pushed {image}")),
            "{image} ({made}) not pushed:\n{}",
            fill.stdout()
        );
    }
    eprintln!("registry filled in {:?}:\n{}", started.elapsed(), fill.stdout());

    // The config: the registry as the lab's one private registry, CA, credentials kept outside the project.
    let creds: PathBuf = w.join("registries.toml");
    let write_creds = |password: &str| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(&creds, format!("[\"{r}\"]\nusername = \"{USER}\"\npassword = \"{password}\"\n"))
            .unwrap();
        std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o600)).unwrap();
    };
    std::fs::copy(w.join("ca.pem"), dir.join("registry-ca.pem")).unwrap();
    let cfg_path = dir.join("box-config.toml");
    let text = std::fs::read_to_string(&cfg_path).unwrap();
    assert!(text.contains("images = \"auto\""), "the shipped config sets images = \"auto\"");
    let text = text.replace(
        "images = \"auto\"",
        &format!(
            "images = \"auto\"\nregistry_mirrors = [\"https://{r}\"]\n\
             registry_proxies = {{ \"docker.io\" = \"{r}/docker.io\", \"gcr.io\" = \"{r}/gcr.io\" }}\n\
             ca_certs = [\"registry-ca.pem\"]\nregistry_credentials = \"{}\"\npip_index_url = \"{pip}/simple\"",
            creds.display()
        ),
    );
    std::fs::write(&cfg_path, text).unwrap();

    // 1. A wrong password: a clear error naming the registry; the secret is never printed (nor -vv, nor --json).
    write_creds(WRONG);
    for args in [&["provision"][..], &["--json", "-vv", "provision"]] {
        let bad = run(args).failure();
        let all = format!("{}{}", bad.stdout(), bad.stderr());
        assert!(all.contains(&format!("docker login to registry {r} as {USER} failed")), "{args:?}:\n{all}");
        assert!(all.contains("hint: check the username and password"), "{all}");
        assert!(!all.contains(WRONG) && !all.contains(PASSWORD), "a secret was printed:\n{all}");
    }
    eprintln!("wrong password case done at {:?}", started.elapsed());

    // 2. The right password: registry mode, every service healthy, the table says so.
    write_creds(PASSWORD);
    let t = Instant::now();
    let up = run(&["provision"]);
    let (out, err) = (up.stdout(), up.stderr());
    assert_eq!(up.code(), Some(0), "registry mode provision failed:\n{out}\n{err}");
    for svc in ["demo-app", "prometheus", "alertmanager", "node-exporter", "grafana", "cadvisor"] {
        assert!(out.contains(&format!("✓ {svc}")), "{svc} not healthy in registry mode:\n{out}\n{err}");
    }
    assert!(out.contains("images: registry mode (registry answered in "), "{out}");
    assert!(!out.contains(PASSWORD) && !err.contains(PASSWORD));
    eprintln!("registry mode provision took {:?}", t.elapsed());
    // The digests were recorded: a rebuild pulls the same bytes.
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(".provisioner/images.json")).unwrap()).unwrap();
    let digests = rec["digests"].as_object().unwrap();
    assert_eq!(digests.len(), 5, "{rec}");
    assert!(digests.values().all(|d| d.as_str().unwrap().contains("@sha256:")), "{rec}");
    assert_eq!(rec["resolved"]["mode"], "registry");
    let h = run(&["health"]).success();
    assert!(h.stdout().contains("images: registry mode"), "{}", h.stdout());

    // 3. The registry stopped: `auto` falls back to debian mode within its deadline and says so.
    drop(registry);
    let t = Instant::now();
    let down = run(&["--json", "provision"]);
    let mode = events(&down.stdout(), "image_mode");
    assert_eq!(mode.len(), 1, "{}\n{}", down.stdout(), down.stderr());
    assert_eq!(mode[0]["mode"], "debian");
    let reason = mode[0]["reason"].as_str().unwrap();
    assert!(
        reason.starts_with(&format!(
            "no answer from {r} in 5 s: debian mode, grafana and cadvisor unavailable"
        )),
        "{reason}"
    );
    let phases: Vec<serde_json::Value> = events(&down.stdout(), "phase_end");
    if let Some(p) = phases.iter().find(|p| p["phase"] == "image mode") {
        let secs = p["seconds"].as_f64().unwrap_or(0.0);
        assert!(secs < 15.0, "the probe took {secs} s (deadline 5 s): {p}");
    }
    assert_eq!(down.code(), Some(0), "debian fallback failed:\n{}\n{}", down.stdout(), down.stderr());
    let doc = events(&down.stdout(), "health").pop().expect("health document");
    assert_eq!(doc["images"]["mode"], "debian", "{doc}");
    eprintln!(
        "debian fallback provision took {:?}; registry cases {:?} in all",
        t.elapsed(),
        started.elapsed()
    );
}
