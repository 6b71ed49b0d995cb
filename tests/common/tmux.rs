//! A terminal program under tmux, driven the way a person uses it: `send-keys` types,
//! `capture-pane` reads the screen.

use std::process::Command;
use std::time::{Duration, Instant};

use super::unique;

pub struct Tmux {
    session: String,
}

impl Tmux {
    pub fn start(command: &str) -> Tmux {
        let session = unique("tmux").replace('_', "-");
        let status = Command::new("tmux")
            .args(["new-session", "-d", "-s", &session, "-x", "250", "-y", "60"])
            .arg(command)
            .status()
            .expect("tmux (apt-get install tmux)");
        assert!(status.success(), "tmux new-session");
        Tmux { session }
    }

    /// Types `text` and presses Enter.
    pub fn type_line(&self, text: &str) {
        self.keys(&["-l", text]);
        self.keys(&["Enter"]);
    }

    /// Keys as tmux names them (`Tab`, `Up`, `C-u`), or text with `-l` first.
    pub fn keys(&self, keys: &[&str]) {
        let status = Command::new("tmux")
            .args(["send-keys", "-t", &self.session])
            .args(keys)
            .status()
            .expect("tmux send-keys");
        assert!(status.success());
    }

    /// Pastes tmux buffer `buffer` as a terminal without bracketed paste gets a paste: one
    /// write, each newline an Enter.
    pub fn paste(&self, buffer: &str) {
        let status = Command::new("tmux")
            .args(["paste-buffer", "-d", "-b", buffer, "-t", &self.session])
            .status()
            .expect("tmux paste-buffer");
        assert!(status.success());
    }

    /// Whether the program still runs (its session ends with it).
    pub fn is_running(&self) -> bool {
        Command::new("tmux")
            .args(["has-session", "-t", &self.session])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    }

    pub fn screen(&self) -> String {
        let output = Command::new("tmux")
            .args(["capture-pane", "-p", "-J", "-t", &self.session])
            .output()
            .expect("tmux capture-pane");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Waits (bounded) until the screen shows `needle` `times` times.
    pub fn wait_for(&self, needle: &str, times: usize) -> String {
        self.wait_until(|screen| screen.matches(needle).count() >= times)
    }

    /// Waits (bounded by the reply timeout) until `done` holds for the screen.
    pub fn wait_until(&self, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + super::REPLY_TIMEOUT;
        loop {
            let screen = self.screen();
            if done(&screen) || Instant::now() > deadline {
                return screen;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.session])
            .stderr(std::process::Stdio::null())
            .status();
    }
}
