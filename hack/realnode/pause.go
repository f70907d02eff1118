// Command pause is the sandbox ("pause") container of the dev cluster's real nodes: it holds the pod's
// namespaces and sleeps in pause(2) until SIGTERM or SIGINT, like upstream's pause.c. Built
// statically (CGO_ENABLED=0), it is the only file of the image (no registry is reachable here).
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-sigs
		os.Exit(0)
	}()
	for {
		_ = syscall.Pause()
	}
}
