//! Output forwarding and stdin of local jobs, through the real `ringleader` binary.

use std::collections::BTreeMap;
use std::process::Stdio;

use ringleader_tests::{ringleader, run};

/// Checks that `text` holds, for every rank, lines "<tag> <rank> <i> <padding>"
/// for i in 0..lines, whole and in order per rank.
fn check_lines(text: &str, tag: &str, ranks: usize, lines: usize) {
    let mut next: BTreeMap<usize, usize> = BTreeMap::new();
    for (number, line) in text.lines().enumerate() {
        let fields: Vec<&str> = line.split(' ').collect();
        assert!(
            fields.len() == 4 && fields[0] == tag && fields[3] == "abcdefghijklmnopqrstuvwxyz",
            "line {number} is spliced or damaged: {line:?}"
        );
        let rank: usize = fields[1].parse().unwrap();
        let index: usize = fields[2].parse().unwrap();
        let expected = next.entry(rank).or_insert(0);
        assert_eq!(index, *expected, "rank {rank} line out of order or lost");
        *expected += 1;
    }
    for rank in 0..ranks {
        assert_eq!(next.get(&rank).copied().unwrap_or(0), lines, "lines of rank {rank}");
    }
}

#[test]
fn many_lines_from_many_ranks_arrive_whole_and_in_order() {
    let lines = 100_000;
    let script = format!(
        r#"BEGIN {{ r = ENVIRON["MLX_RANK"]; for (i = 0; i < {lines}; i++) {{
            print "out", r, i, "abcdefghijklmnopqrstuvwxyz";
            print "err", r, i, "abcdefghijklmnopqrstuvwxyz" > "/dev/stderr" }} }}"#
    );
    let output = run(&mut ringleader(["-n", "8", "--", "awk", &script]), b"");
    assert_eq!(output.code(), Some(0));
    check_lines(&output.stdout_text(), "out", 8, lines);
    check_lines(&output.stderr_text(), "err", 8, lines);
}

#[test]
fn megabyte_line_and_unterminated_last_lines_stay_whole() {
    let script = r#"if [ "$MLX_RANK" = 0 ]; then head -c 1048576 /dev/zero | tr '\0' x; else printf 'short line\nno newline at end'; fi"#;
    let output = run(&mut ringleader(["-n", "4", "--", "sh", "-c", script]), b"");
    assert_eq!(output.code(), Some(0));
    let text = output.stdout_text();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1 + 3 * 2, "{:?}", lines.iter().map(|l| l.len()).collect::<Vec<_>>());
    assert_eq!(lines.iter().filter(|l| l.len() == 1 << 20 && l.bytes().all(|b| b == b'x')).count(), 1);
    assert_eq!(lines.iter().filter(|l| **l == "short line").count(), 3);
    assert_eq!(lines.iter().filter(|l| **l == "no newline at end").count(), 3);
}

#[test]
fn stdout_and_stderr_stay_separate() {
    let output = run(&mut ringleader(["-n", "2", "--", "sh", "-c", "echo to-out; echo to-err >&2"]), b"");
    assert_eq!(output.stdout_text(), "to-out\nto-out\n");
    assert_eq!(output.stderr_text(), "to-err\nto-err\n");
}

#[test]
fn binary_output_is_forwarded_byte_exact() {
    let output = run(&mut ringleader(["--", "sh", "-c", r"printf 'a\r\nb\0c\377\n'"]), b"");
    assert_eq!(output.stdout, b"a\r\nb\0c\xff\n");
}

#[test]
fn stdin_reaches_every_rank_and_eof_ends_it() {
    let output = run(&mut ringleader(["-n", "3", "--", "cat"]), b"hello\nworld\n");
    assert_eq!(output.code(), Some(0));
    assert_eq!(output.stdout_text().matches("hello\nworld\n").count(), 3, "{}", output.stdout_text());
}

#[test]
fn stdin_zero_feeds_only_rank_zero() {
    let script = r#"n=$(wc -c); echo "rank $MLX_RANK read $n bytes""#;
    let output = run(&mut ringleader(["-n", "3", "--stdin", "0", "--", "sh", "-c", script]), b"12345");
    assert_eq!(output.code(), Some(0));
    let text = output.stdout_text();
    assert!(text.contains("rank 0 read 5 bytes"), "{text}");
    assert!(text.contains("rank 1 read 0 bytes"), "{text}");
    assert!(text.contains("rank 2 read 0 bytes"), "{text}");
}

#[test]
fn tag_output_prefixes_rank_and_host() {
    let output = run(&mut ringleader(["-n", "2", "--tag-output", "--", "sh", "-c", "echo hi; echo oops >&2"]), b"");
    let text = output.stdout_text();
    assert!(text.contains("[0 127.0.0.1] hi\n"), "{text}");
    assert!(text.contains("[1 127.0.0.1] hi\n"), "{text}");
    assert!(output.stderr_text().contains("[1 127.0.0.1] oops\n"), "{}", output.stderr_text());
}

/// A progress bar redraws its line after `\r`; the tag must come back with
/// it, or the terminal shows the redraw over the tag.
#[test]
fn tag_output_follows_carriage_returns() {
    let script = r#"printf 'step 1\rstep 2\rdone\r\n\nlast\n'"#;
    let output = run(&mut ringleader(["--tag-output", "--", "sh", "-c", script]), b"");

    let tag = "[0 127.0.0.1] ";
    let expected = format!("{tag}step 1\r{tag}step 2\r{tag}done\r\n{tag}\n{tag}last\n");
    assert_eq!(output.stdout_text(), expected);
}

#[test]
fn output_dir_keeps_each_rank_stream() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("logs");
    let script = r#"echo "out of $MLX_RANK"; printf 'err of %s' "$MLX_RANK" >&2"#;
    let output = run(
        &mut ringleader(["-n", "2", "--output-dir", out.to_str().unwrap(), "--", "sh", "-c", script]),
        b"",
    );
    assert_eq!(output.code(), Some(0));
    for rank in 0..2 {
        let stdout = std::fs::read_to_string(out.join(format!("rank-{rank}.stdout"))).unwrap();
        let stderr = std::fs::read_to_string(out.join(format!("rank-{rank}.stderr"))).unwrap();
        assert_eq!(stdout, format!("out of {rank}\n"));
        assert_eq!(stderr, format!("err of {rank}"), "files keep the bytes exactly, without an added newline");
    }
}

/// A smaller job in the same directory leaves no files of the earlier
/// job's extra ranks, so the directory contains one job's output.
#[test]
fn output_dir_drops_stale_rank_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("logs");
    std::fs::create_dir(&out).unwrap();
    for name in ["rank-2.stdout", "rank-2.stderr", "rank-10.stdout", "notes.txt", "rank-x.stdout"] {
        std::fs::write(out.join(name), "earlier job\n").unwrap();
    }
    let output = run(&mut ringleader(["-n", "2", "--output-dir", out.to_str().unwrap(), "--", "true"]), b"");

    assert_eq!(output.code(), Some(0), "{}", output.stderr_text());
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let expected = ["notes.txt", "rank-0.stderr", "rank-0.stdout", "rank-1.stderr", "rank-1.stdout", "rank-x.stdout"];
    assert_eq!(names, expected);
}

#[test]
fn output_written_just_before_failure_is_not_lost() {
    let script = r#"if [ "$MLX_RANK" = 1 ]; then seq 1 20000; exit 4; fi; exec sleep 60"#;
    let output = run(&mut ringleader(["-n", "2", "--", "sh", "-c", script]), b"");
    assert_eq!(output.code(), Some(4));
    let expected: String = (1..=20000).map(|i| format!("{i}\n")).collect();
    assert_eq!(output.stdout_text(), expected);
}

#[test]
fn closed_launcher_stdout_stops_writers_with_sigpipe() {
    use std::io::BufRead;

    let mut child = ringleader_tests::start(&mut ringleader(["-n", "2", "--", "sh", "-c", "exec yes line"]));
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    assert_eq!(first, "line\n");
    // Like `ringleader ... | head -1`: the reader goes away.
    drop(stdout);

    let output = ringleader_tests::finish(child);
    assert_eq!(output.code(), Some(128 + 13), "ranks writing to a closed stdout end by SIGPIPE");
    assert!(output.stderr_text().contains("killed by SIGPIPE"), "{}", output.stderr_text());
}

/// Regression: with `2>&1` the two streams' writers interleaved their
/// buffers on the shared pipe and spliced lines.
#[test]
fn shared_stdout_and_stderr_keep_lines_whole() {
    let awk = r#"BEGIN { r = ENVIRON["MLX_RANK"]; for (i = 0; i < 200000; i++) {
        if (r == 0) print "out", r, i, "abcdefghijklmnopqrstuvwxyz";
        else print "err", r, i, "abcdefghijklmnopqrstuvwxyz" > "/dev/stderr" } }"#;
    let launcher = ringleader_tests::bin("ringleader");
    let script = format!("exec {} -n 2 -- awk '{}' 2>&1", launcher.display(), awk);
    let output = run(std::process::Command::new("sh").args(["-c", &script]), b"");
    assert_eq!(output.code(), Some(0));
    let mut counts = [0usize; 2];
    for (number, line) in output.stdout_text().lines().enumerate() {
        let fields: Vec<&str> = line.split(' ').collect();
        assert_eq!(fields.len(), 4, "line {number} is spliced: {line:?}");
        assert_eq!(fields[3], "abcdefghijklmnopqrstuvwxyz", "line {number} is spliced: {line:?}");
        counts[fields[1].parse::<usize>().unwrap()] += 1;
    }
    assert_eq!(counts, [200000, 200000]);
}

/// Regression guard: mlx.launch switches its stdin to non-blocking mode,
/// which changes the file description it shares with the shell.
#[test]
fn launcher_leaves_stdio_flags_as_it_found_them() {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    use std::os::fd::AsRawFd;

    let (stdin_read, stdin_write) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
    let (stdout_read, stdout_write) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
    let flags = |fd: &std::os::fd::OwnedFd| OFlag::from_bits_truncate(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL).unwrap());
    let before = (flags(&stdin_read), flags(&stdout_write));

    let mut command = ringleader(["-n", "2", "--", "cat"]);
    command
        .stdin(std::process::Stdio::from(stdin_read.try_clone().unwrap()))
        .stdout(std::process::Stdio::from(stdout_write.try_clone().unwrap()))
        .stderr(std::process::Stdio::null());
    let mut child = command.spawn().unwrap();
    drop(stdin_write);
    let status = ringleader_tests::wait_with_limit(&mut child, ringleader_tests::HANG_LIMIT);
    drop(stdout_read);

    assert!(status.success());
    assert_eq!((flags(&stdin_read), flags(&stdout_write)), before);
    assert!(!flags(&stdin_read).contains(OFlag::O_NONBLOCK));
}

/// Output that cannot be written fails the job, as a full disk fails `cat`,
/// even though every rank exited 0.
#[test]
fn full_disk_fails_the_job() {
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full").expect("open /dev/full");
    let mut command = ringleader(["-n", "2", "--", "sh", "-c", "echo one; echo two"]);
    command.stdin(Stdio::null()).stdout(full).stderr(Stdio::piped());
    let output = command.output().expect("run the launcher");

    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.matches("writing the ranks' output failed").count(), 1, "{stderr}");
    assert!(stderr.contains("No space left on device"), "{stderr}");
    assert!(stderr.contains("every rank exited 0, but some of their output could not be written"), "{stderr}");
}

/// The launcher's own messages must not panic (exit 101) when stderr or
/// stdout cannot be written.
#[test]
fn unwritable_stderr_keeps_the_jobs_exit_code() {
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full").expect("open /dev/full");
    let mut command = ringleader(["-n", "2", "--", "sh", "-c", "exit 3"]);
    command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(full);
    let status = command.status().expect("run the launcher");
    assert_eq!(status.code(), Some(3));

    let mut dry_run = ringleader(["-n", "2000", "--dry-run", "--", "true"]);
    dry_run.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = dry_run.spawn().expect("start the dry run");
    drop(child.stdout.take());
    let output = child.wait_with_output().expect("wait for the dry run");
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
}
