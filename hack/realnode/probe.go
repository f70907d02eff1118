// Command probe is the real nodes' test workload, one static file in an image built without a
// registry. `probe DIR` reports what a restricted pod sees and exits 0 only when it runs as a non-root
// user, its root filesystem is read-only and DIR (a volume) is writable. `probe serve ADDR` answers
// every HTTP request with "probe ok <hostname>" (a Service backend for kube-proxy).
package main

import (
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"syscall"
)

func main() {
	if len(os.Args) > 2 && os.Args[1] == "serve" {
		host, _ := os.Hostname()
		http.HandleFunc("/", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintf(w, "probe ok %s\n", host) })
		fmt.Printf("probe: serving on %s\n", os.Args[2])
		if err := http.ListenAndServe(os.Args[2], nil); err != nil {
			fmt.Printf("probe: %v\n", err)
			os.Exit(1)
		}
		return
	}
	fail := func(format string, a ...any) {
		fmt.Printf("probe: FAIL "+format+"\n", a...)
		os.Exit(1)
	}
	uid, gid := os.Getuid(), os.Getgid()
	fmt.Printf("probe: uid=%d gid=%d\n", uid, gid)
	if uid == 0 {
		fail("running as root")
	}
	err := os.WriteFile("/probe-root-write", []byte("x"), 0o600)
	if !errors.Is(err, syscall.EROFS) {
		fail("writing to / gave %v, want a read-only file system", err)
	}
	fmt.Println("probe: root filesystem is read-only")
	if len(os.Args) > 1 {
		path := filepath.Join(os.Args[1], "probe")
		if err := os.WriteFile(path, []byte("ok\n"), 0o600); err != nil {
			fail("writing to the volume: %v", err)
		}
		fmt.Printf("probe: wrote %s\n", path)
	}
	fmt.Println("probe: ok")
}
