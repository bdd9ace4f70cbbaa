// Command etcd is a thin wrapper around the upstream etcd server entry point
// (go.etcd.io/etcd/server/v3/etcdmain). It exists only so that e2e/controlplane/build.sh
// can produce an etcd binary from the Go module proxy; it is a test-only tool and
// is never shipped with commonground.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
