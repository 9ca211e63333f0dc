//! Hosts in network namespaces for partition tests (issue #11 item 3): one
//! namespace per host, each with one veth (`eth0`, `10.77.S.i/24`) whose
//! other end is a port of one bridge in a "switch" namespace, plus a port
//! for the test process itself (`10.77.S.100`, in the namespace the test
//! runs in), so the test can be the client and publisher host.
//!
//! Links are cut at the switch, so the hosts' own interfaces stay up and
//! nothing tells their sockets (a silent cut, like a lost route): a port set
//! down drops everything to and from that host; ports set *isolated* cannot
//! reach each other but still reach every other port (`bridge link set dev
//! P isolated on`), which cuts exactly the links between two groups.
//!
//! Names carry the pid and a tag, so parallel tests and parallel runs do not
//! collide. Everything is removed on drop, also after a panic.

use std::process::{Command, Stdio};

/// The port of the test process's own host.
pub const TESTER: usize = usize::MAX;

/// A switch and its hosts.
pub struct Net {
    /// Third octet of every address.
    pub subnet: u8,
    switch: String,
    hosts: Vec<String>,
    /// The test process's interface (in the test's namespace).
    local_if: String,
}

/// Runs `ip ARGS` (or another iproute2 tool); Err names the command and what it printed.
pub fn run(tool: &str, args: &[&str]) -> Result<(), String> {
    let out =
        Command::new(tool).args(args).stdin(Stdio::null()).output().map_err(|e| format!("{tool}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("`{tool} {}`: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl Net {
    /// Builds a switch with `hosts` hosts (addresses `10.77.S.1..`, S a
    /// subnet no route here uses yet) and the tester's port. Err: why
    /// namespaces cannot be used here (the caller prints `SKIP: …` and
    /// returns); a half-built net is removed.
    pub fn new(tag: &str, hosts: usize) -> Result<Net, String> {
        let pid = std::process::id();
        remove_stale();
        // One subnet per net, not routed here yet (by another test of this
        // process or another run); chosen and claimed under one lock.
        static CLAIM: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _claim = CLAIM.lock().unwrap_or_else(|e| e.into_inner());
        let subnet = (0..250u32)
            .map(|k| ((pid + k) % 250 + 1) as u8)
            .find(|s| {
                let out = Command::new("ip").args(["route", "show", &format!("10.77.{s}.0/24")]).output();
                out.is_ok_and(|o| o.stdout.is_empty())
            })
            .ok_or("no free 10.77.x.0/24 subnet (or no `ip`)")?;
        let name = |h: &str| format!("hz-{pid}-{tag}-{h}");
        let mut net = Net {
            subnet,
            switch: name("sw"),
            hosts: Vec::new(),
            local_if: format!("hz{:x}{subnet:02x}", pid),
        };
        run("ip", &["netns", "add", &net.switch])
            .map_err(|e| format!("cannot create a network namespace: {e}"))?;
        let sw = net.switch.clone();
        let in_sw = |args: &[&str]| {
            let mut v = vec!["-n", sw.as_str()];
            v.extend_from_slice(args);
            run("ip", &v)
        };
        in_sw(&["link", "set", "lo", "up"])?;
        in_sw(&["link", "add", "br0", "type", "bridge"])?;
        in_sw(&["link", "set", "br0", "up"])?;
        for i in 0..hosts {
            let ns = name(&format!("h{i}"));
            run("ip", &["netns", "add", &ns])?;
            net.hosts.push(ns.clone());
            let port = format!("p{i}");
            let addr = format!("{}/24", net.addr(i));
            in_sw(&["link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
            in_sw(&["link", "set", &port, "master", "br0", "up"])?;
            run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
            run("ip", &["-n", &ns, "addr", "add", &addr, "dev", "eth0"])?;
            run("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
        }
        let li = net.local_if.clone();
        run("ip", &["link", "add", &li, "type", "veth", "peer", "name", "pt", "netns", &sw])?;
        in_sw(&["link", "set", "pt", "master", "br0", "up"])?;
        run("ip", &["addr", "add", &format!("{}/24", net.addr(TESTER)), "dev", &li])?;
        run("ip", &["link", "set", &li, "up"])?;
        Ok(net)
    }

    /// Host `i`'s address (`TESTER`: the test process's).
    pub fn addr(&self, i: usize) -> String {
        let last = if i == TESTER { 100 } else { i + 1 };
        format!("10.77.{}.{last}", self.subnet)
    }

    /// `["ip", "netns", "exec", NS]` for host `i`: the words of [`Net::exec`].
    pub fn exec_words(&self, i: usize) -> Vec<String> {
        ["ip", "netns", "exec", &self.hosts[i]].iter().map(|w| w.to_string()).collect()
    }

    /// `ip netns exec NS` for host `i`; append the program and its arguments.
    pub fn exec(&self, i: usize) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.hosts[i]]);
        c
    }

    fn port(i: usize) -> String {
        if i == TESTER {
            "pt".to_owned()
        } else {
            format!("p{i}")
        }
    }

    /// Sets host `i`'s switch port down (cut from everyone) or up.
    pub fn link(&self, i: usize, up: bool) {
        let port = Net::port(i);
        run("ip", &["-n", &self.switch, "link", "set", &port, if up { "up" } else { "down" }]).unwrap();
    }

    /// Isolates the ports of `hosts` from each other (on), or undoes it.
    pub fn isolate(&self, hosts: &[usize], on: bool) {
        for &i in hosts {
            let port = Net::port(i);
            let v = ["netns", "exec", &self.switch, "bridge", "link", "set", "dev", &port, "isolated"];
            let mut v = v.to_vec();
            v.push(if on { "on" } else { "off" });
            run("ip", &v).unwrap();
        }
    }
}

/// Removes the namespaces of earlier runs whose process is gone (killed
/// before its drop could run).
fn remove_stale() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else { return };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid =
            name.strip_prefix("hz-").and_then(|r| r.split('-').next()).and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|p| !std::path::Path::new(&format!("/proc/{p}")).exists()) {
            let _ = run("ip", &["netns", "del", &name]);
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting the switch destroys every veth pair (their ends live there).
        let _ = run("ip", &["link", "del", &self.local_if]);
        for ns in self.hosts.iter().chain([&self.switch]) {
            let _ = run("ip", &["netns", "del", ns]);
        }
    }
}
