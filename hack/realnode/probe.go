// Command probe is the real nodes' test workload, one static file in an image built without a
// registry. `probe DIR` reports what a restricted pod sees and exits 0 only when it runs as a non-root
// user, its root filesystem is read-only and DIR (a volume) is writable. `probe serve ADDR` answers
// every HTTP request with "probe ok <hostname>" (a Service backend for kube-proxy). `probe apiserver`
// asks the API server for /version the way an in-cluster client does: the `kubernetes` Service's
// KUBERNETES_SERVICE_HOST/PORT, TLS verified against the service account's CA, its token.
package main

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"syscall"
	"time"
)

const serviceAccount = "/var/run/secrets/kubernetes.io/serviceaccount"

func apiserver() error {
	host, port := os.Getenv("KUBERNETES_SERVICE_HOST"), os.Getenv("KUBERNETES_SERVICE_PORT")
	if host == "" || port == "" {
		return errors.New("KUBERNETES_SERVICE_HOST/PORT are not set")
	}
	ca, err := os.ReadFile(filepath.Join(serviceAccount, "ca.crt"))
	if err != nil {
		return err
	}
	token, err := os.ReadFile(filepath.Join(serviceAccount, "token"))
	if err != nil {
		return err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(ca) {
		return errors.New("no certificate in the service account's ca.crt")
	}
	client := &http.Client{Timeout: 10 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	url := "https://" + net.JoinHostPort(host, port) + "/version"
	req, _ := http.NewRequest(http.MethodGet, url, nil)
	req.Header.Set("Authorization", "Bearer "+string(token))
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	var version struct {
		GitVersion string `json:"gitVersion"`
	}
	if resp.StatusCode != http.StatusOK || json.Unmarshal(body, &version) != nil {
		return fmt.Errorf("GET %s: %s %s", url, resp.Status, body)
	}
	fmt.Printf("probe: apiserver %s at %s\n", version.GitVersion, url)
	return nil
}

func main() {
	if len(os.Args) > 1 && os.Args[1] == "apiserver" {
		if err := apiserver(); err != nil {
			fmt.Printf("probe: FAIL reaching the API server: %v\n", err)
			os.Exit(1)
		}
		fmt.Println("probe: ok")
		return
	}
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
