//! VM tier, run inside `guest::vm_up_verify_reprovision_destroy` on its already-running guest (no boot of its own):
//! `images = "auto"` against a REAL registry, Debian's `docker-registry` (Distribution 2.8) on the host's
//! 127.0.0.1 (the guest reaches it at 10.0.2.2 through QEMU's user network), with TLS from a CA this test makes
//! (openssl CLI) and basic auth (htpasswd -B), used as the lab's one private registry (`registry_proxies` for
//! docker.io and gcr.io, also named in `registry_mirrors`). The registry is filled from the host with the images
//! registry mode names, each the debian-mode base layer plus one small layer: Prometheus, Alertmanager and node
//! exporter carry the config and data directory of the debian-mode images the guest built (plus a `wget` shim:
//! registry mode's healthchecks use wget); Grafana, cAdvisor and the demo app's Python base are STAND-INS (a tiny
//! HTTP server answering the health endpoints and /metrics; Debian's python3 with pip unpacked from its wheel).
//! The demo app's pinned packages come from a local index: `pip download` on the
//! host into a directory served over HTTP on 127.0.0.1.
//!
//! Cases: a wrong password (a clear error naming the registry, the secret never printed); the right one (all six
//! services healthy, the table says registry mode, the digests recorded and used by the next provision); the
//! registry stopped (`auto` falls back to debian mode within
//! its deadline and says so).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::{free_port, wait_until, Proc, Run};

const USER: &str = "lab";
const PASSWORD: &str = "Reg-pass-7f3c9d-never-printed";
const WRONG: &str = "Wrong-pass-41b2e8-never-printed";

/// Images the registry gets, as registry mode names them (repository paths under the proxy prefix), and what
/// each is made from in the guest.
const IMAGES: [(&str, &str); 6] = [
    (
        "docker.io/prom/prometheus:v2.53.2",
        "provisioner-lab/prometheus:debian's config and data dir, a wget shim",
    ),
    (
        "docker.io/prom/alertmanager:v0.27.0",
        "provisioner-lab/alertmanager:debian's config and data dir, a wget shim",
    ),
    ("docker.io/prom/node-exporter:v1.8.2", "provisioner-lab/node-exporter:debian's config, a wget shim"),
    ("docker.io/grafana/grafana:11.2.2", "stand-in grafana (answers /api/health on 3000)"),
    ("gcr.io/cadvisor/cadvisor:v0.49.1", "stand-in cadvisor (answers /healthz and /metrics on 8080)"),
    (
        "docker.io/library/python:3.12.7-slim-bookworm",
        "stand-in python (Debian's python3, pip unpacked from its wheel)",
    ),
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

/// Fills the registry from the host, as a registry is filled by whoever publishes images: every image is the
/// debian-mode base layer (the tarball cached on the host, the one the guest's `provisioner-base:bookworm` was
/// imported from: same diff id) plus one small layer and a config, pushed with the registry API (blobs, a cross-repo
/// mount of the base layer, manifests). Its input is a JSON spec on stdin (`fill_spec`); it prints the base layer's
/// digest and diff id, then `pushed NAME:TAG` per image. Nothing is built or pushed from the TCG guest (a push of
/// the 300 MB base from there runs at ~130 KB/s, and its pull spends minutes in `docker-untar`).
const PUSH: &str = r#"
import base64, gzip, hashlib, io, json, os, ssl, sys, tarfile, tempfile, urllib.request, zipfile
reg, ca, user, pw, tarball = sys.argv[1:]
spec = json.load(sys.stdin)
ctx = ssl.create_default_context(cafile=ca)
auth = "Basic " + base64.b64encode(("%s:%s" % (user, pw)).encode()).decode()
def call(method, url, data=None, headers=None):
    if not url.startswith("http"):
        url = "https://%s%s" % (reg, url)
    h = {"Authorization": auth}
    h.update(headers or {})
    return urllib.request.urlopen(urllib.request.Request(url, data=data, method=method, headers=h), context=ctx)
def blob(name, data, digest):
    loc = call("POST", "/v2/%s/blobs/uploads/" % name).headers["Location"]
    loc += ("&" if "?" in loc else "?") + "digest=" + digest
    call("PUT", loc, data=data, headers={"Content-Length": str(len(data)) if isinstance(data, bytes) else
         str(os.path.getsize(data.name)), "Content-Type": "application/octet-stream"})
def sha(b):
    return "sha256:" + hashlib.sha256(b).hexdigest()
# The base layer, once, in its own repository: gzip of the cached tarball.
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
base = ("sha256:" + packed.hexdigest(), os.path.getsize(gz.name), "sha256:" + raw.hexdigest())
with open(gz.name, "rb") as f:
    blob("provisioner-test/base", f, base[0])
os.unlink(gz.name)
print("base", base[0], base[2], flush=True)
for img in spec["images"]:
    name, tag = img["name"], img["tag"]
    # The image's own layer: files, directories and symlinks from the spec; wheels unpacked where asked.
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
        def add(path, kind, mode, uid=0, gid=0, data=b"", target=""):
            ti = tarfile.TarInfo(path)
            ti.mode, ti.uid, ti.gid, ti.mtime = mode, uid, gid, 0
            if kind == "dir":
                ti.type = tarfile.DIRTYPE
                t.addfile(ti)
            elif kind == "symlink":
                ti.type, ti.linkname = tarfile.SYMTYPE, target
                t.addfile(ti)
            else:
                ti.size = len(data)
                t.addfile(ti, io.BytesIO(data))
        for e in img["entries"]:
            if e["kind"] == "wheel":
                with zipfile.ZipFile(e["source"]) as w:
                    for n in w.namelist():
                        if not n.endswith("/"):
                            add(e["path"] + "/" + n, "file", 0o644, data=w.read(n))
            else:
                data = e.get("data", "").encode()
                add(e["path"], e["kind"], int(e["mode"], 8), e.get("uid", 0), e.get("gid", 0), data,
                    e.get("target", ""))
    layer_raw = buf.getvalue()
    layer = gzip.compress(layer_raw, compresslevel=6, mtime=0)
    blob(name, layer, sha(layer))
    # The base layer: mounted from its repository (no bytes sent).
    r = call("POST", "/v2/%s/blobs/uploads/?mount=%s&from=provisioner-test/base" % (name, base[0]))
    assert r.status == 201, "mount of the base layer into %s: HTTP %s" % (name, r.status)
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": img["config"],
        "rootfs": {"type": "layers", "diff_ids": [base[2], sha(layer_raw)]},
        "history": [{"created_by": "provisioner test: the debian-mode base rootfs"},
                    {"created_by": "provisioner test: " + img["made"]}]}).encode()
    blob(name, config, sha(config))
    manifest = json.dumps({"schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": sha(config),
                   "size": len(config)},
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "digest": base[0],
                    "size": base[1]},
                   {"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "digest": sha(layer),
                    "size": len(layer)}]}).encode()
    call("PUT", "/v2/%s/manifests/%s" % (name, tag), data=manifest,
         headers={"Content-Type": "application/vnd.docker.distribution.manifest.v2+json"})
    print("pushed %s:%s" % (name, tag), flush=True)
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

const PIP_SCRIPT: &str =
    "#!/usr/bin/python3\n# pip, unpacked from its wheel by the registry test\nimport sys\n\
                          from pip._internal.cli.main import main\nsys.exit(main())\n";

/// `NAME:UID:GID` lines of /etc/passwd in the base tarball, for the owner of the images' data directories.
fn base_user(tarball: &Path, user: &str) -> (u32, u32) {
    let mut ar = tar::Archive::new(std::fs::File::open(tarball).unwrap());
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let path = e.path().unwrap().into_owned();
        if path.to_string_lossy().trim_start_matches("./") == "etc/passwd" {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut e, &mut text).unwrap();
            let line = text.lines().find(|l| l.starts_with(&format!("{user}:"))).expect("user in the base");
            let f: Vec<&str> = line.split(':').collect();
            return (f[2].parse().unwrap(), f[3].parse().unwrap());
        }
    }
    panic!("no etc/passwd in {}", tarball.display())
}

/// The base tarball's user and group files without `user`'s lines, as entries of an image's layer. The base rootfs
/// carries the demo app's user `app` (src/lab `BASE_SETUP`); the real Python image has none, and the registry-mode
/// Dockerfile's `useradd` fails on a user that exists, so the Python stand-in drops it as that image would lack it.
fn base_files_without_user(tarball: &Path, user: &str) -> Vec<serde_json::Value> {
    let wanted = ["etc/passwd", "etc/group", "etc/shadow", "etc/gshadow"];
    let mut out = Vec::new();
    let mut ar = tar::Archive::new(std::fs::File::open(tarball).unwrap());
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let path = e.path().unwrap().to_string_lossy().trim_start_matches("./").to_string();
        if !wanted.contains(&path.as_str()) {
            continue;
        }
        let (mode, uid, gid) =
            (e.header().mode().unwrap(), e.header().uid().unwrap(), e.header().gid().unwrap());
        let mut text = String::new();
        std::io::Read::read_to_string(&mut e, &mut text).unwrap();
        let kept: String =
            text.lines().filter(|l| !l.starts_with(&format!("{user}:"))).map(|l| format!("{l}\n")).collect();
        out.push(serde_json::json!({"path": path, "kind": "file", "mode": format!("{:o}", mode & 0o7777),
                                    "uid": uid, "gid": gid, "data": kept}));
    }
    assert_eq!(out.len(), wanted.len(), "user and group files in {}", tarball.display());
    out
}

/// What `PUSH` pushes: per image, its repository path in the registry (as registry mode names it through the
/// proxy prefix), its own layer and its config. The Prometheus, Alertmanager and node exporter images take the
/// config of the debian-mode image the guest built (`configs`, from `docker image inspect`) and its data directory,
/// plus a `wget` shim (registry mode's healthchecks use wget); Grafana, cAdvisor and Python are STAND-INS.
fn fill_spec(configs: &serde_json::Value, tarball: &Path, wheels: &Path) -> serde_json::Value {
    use serde_json::json;
    let (puid, pgid) = base_user(tarball, "prometheus");
    let wget = json!({"path": "usr/local/bin/wget", "kind": "file", "mode": "755", "data": WGET});
    let standin = json!({"path": "standin.py", "kind": "file", "mode": "644", "data": STANDIN});
    let env = json!(["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]);
    let data_dir = |d: &str| json!({"path": d, "kind": "dir", "mode": "755", "uid": puid, "gid": pgid});
    let pip_wheel = std::fs::read_dir(wheels)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("pip-"))
        .expect("pip's wheel downloaded");
    let mut python_entries = vec![
        json!({"path": "usr/local/bin/python", "kind": "symlink", "mode": "777", "target": "/usr/bin/python3"}),
        json!({"path": "usr/local/bin/pip", "kind": "file", "mode": "755", "data": PIP_SCRIPT}),
        json!({"path": "usr/local/lib/python3.11/dist-packages", "kind": "wheel", "source": pip_wheel}),
    ];
    python_entries.extend(base_files_without_user(tarball, "app"));
    let image = |repo: &str, made: &str, entries: serde_json::Value, config: serde_json::Value| {
        let (name, tag) = repo.rsplit_once(':').unwrap();
        json!({"name": name, "tag": tag, "made": made, "entries": entries, "config": config})
    };
    json!({"images": [
        image(IMAGES[0].0, IMAGES[0].1, json!([wget, data_dir("prometheus")]), configs["prometheus"].clone()),
        image(IMAGES[1].0, IMAGES[1].1, json!([wget, data_dir("alertmanager")]), configs["alertmanager"].clone()),
        image(IMAGES[2].0, IMAGES[2].1, json!([wget]), configs["node-exporter"].clone()),
        image(IMAGES[3].0, IMAGES[3].1, json!([wget, standin,
            {"path": "run.sh", "kind": "file", "mode": "755", "data": "#!/bin/sh\nexec python3 /standin.py 3000\n"}]),
            json!({"Env": env, "Cmd": ["/run.sh"]})),
        image(IMAGES[4].0, IMAGES[4].1, json!([wget, standin]),
            json!({"Env": env, "Entrypoint": ["python3", "/standin.py", "8080"]})),
        image(IMAGES[5].0, IMAGES[5].1, json!(python_entries),
            json!({"Env": [env[0].clone(), "PIP_BREAK_SYSTEM_PACKAGES=1", "PIP_ROOT_USER_ACTION=ignore"],
                   "Cmd": ["python3"]})),
    ]})
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

    // Fill the registry from the host (see PUSH), with the debian-mode images' configs as the guest's Docker has them.
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
    let inspect = run(&[
        "ssh",
        "-c",
        "printf '{'; for s in prometheus alertmanager node-exporter; do printf '\"%s\": ' $s; \
         sudo -n docker image inspect -f '{{json .Config}}' provisioner-lab/$s:debian; \
         [ $s = node-exporter ] || printf ','; done; printf '}'",
    ])
    .success();
    let configs: serde_json::Value = serde_json::from_str(inspect.stdout().trim()).expect("image configs");
    let spec = fill_spec(&configs, &tarball, &w.join("wheels"));
    let t = Instant::now();
    let push = Command::new("python3")
        .arg("-c")
        .arg(PUSH)
        .args([format!("127.0.0.1:{port}"), w.join("ca.pem").display().to_string(), USER.to_string()])
        .arg(PASSWORD)
        .arg(&tarball)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let push = {
        let mut push = push;
        std::io::Write::write_all(push.stdin.as_mut().unwrap(), spec.to_string().as_bytes()).unwrap();
        drop(push.stdin.take());
        push.wait_with_output().unwrap()
    };
    let pushed = String::from_utf8_lossy(&push.stdout).into_owned();
    assert!(push.status.success(), "fill the registry:\n{pushed}{}", String::from_utf8_lossy(&push.stderr));
    for (image, made) in IMAGES {
        assert!(pushed.contains(&format!("pushed {image}")), "{image} ({made}) not pushed:\n{pushed}");
    }
    eprintln!("registry filled from the host in {:?}:\n{pushed}", t.elapsed());
    // The guest's Docker already has the base layer (`provisioner-base:bookworm` was imported from the same
    // tarball): tell it which registry blob that layer is, as a pull of it would have recorded, so that pulls fetch
    // only each image's own small layer. Docker reads this mapping (distribution/diffid-by-digest) on every pull.
    let base_line = pushed.lines().find(|l| l.starts_with("base ")).expect("base line");
    let (digest, diff_id) = {
        let f: Vec<&str> = base_line.split_whitespace().collect();
        (f[1].to_string(), f[2].to_string())
    };
    run(&[
        "ssh",
        "-c",
        &format!(
            "d=/var/lib/docker/image/overlay2/distribution/diffid-by-digest/sha256; sudo -n mkdir -p $d && \
             printf %s {diff_id} | sudo -n tee $d/{} >/dev/null",
            digest.trim_start_matches("sha256:")
        ),
    ])
    .success();

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
    // A later provision pulls every image by its recorded digest (a rebuild gets the same bytes): one edited file.
    let rules = dir.join("provision/prometheus/alert.rules.yml.hbs");
    let mut edited = std::fs::read_to_string(&rules).unwrap();
    edited.push_str("\n# edited by the registry test\n");
    std::fs::write(&rules, edited).unwrap();
    let again = run(&["provision"]);
    let all = format!("{}{}", again.stdout(), again.stderr());
    assert_eq!(again.code(), Some(0), "{all}");
    assert!(all.contains("(5 by recorded digest)"), "the digests were not used:\n{all}");

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
