//! A real forward proxy (Debian's tinyproxy) in the node's network namespace, as a node behind
//! an egress proxy has one. Its own log shows every CONNECT it carried.

use std::{
    fs,
    path::PathBuf,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use crate::node::Node;

pub struct Proxy {
    pub addr: std::net::SocketAddr,
    child: Child,
    dir: PathBuf,
}

impl Proxy {
    /// Starts tinyproxy on 127.0.0.1:`port` in `node`'s network namespace.
    pub fn start(node: &Node, port: u16) -> Proxy {
        let dir = std::env::temp_dir().join(format!("{}-proxy", node.netns));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let log = dir.join("tinyproxy.log");
        // tinyproxy drops to `nobody`, which must be able to write its log.
        fs::write(&log, "").unwrap();
        std::process::Command::new("chmod")
            .args(["0777"])
            .arg(&dir)
            .status()
            .unwrap();
        std::process::Command::new("chmod")
            .args(["0666"])
            .arg(&log)
            .status()
            .unwrap();
        let conf = dir.join("tinyproxy.conf");
        fs::write(
            &conf,
            format!(
                "User nobody\nGroup nogroup\nPort {port}\nListen 127.0.0.1\nTimeout 30\nLogFile \"{}\"\nLogLevel Connect\nMaxClients 64\nAllow 127.0.0.1\n",
                log.display()
            ),
        )
        .unwrap();
        let child = node
            .command("tinyproxy", None)
            .args(["-d", "-c"])
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tinyproxy (cargo xtask setup installs tinyproxy-bin)");
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while crate::node::in_netns(&node.netns, move || std::net::TcpStream::connect(addr))
            .is_err()
        {
            assert!(Instant::now() < deadline, "tinyproxy did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Proxy { addr, child, dir }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// What tinyproxy logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("tinyproxy.log")).unwrap_or_default()
    }

    /// CONNECT requests it logged for `target` (`host:port`).
    pub fn connects_to(&self, target: &str) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains("CONNECT") && l.contains(target))
            .count()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}
