// SPDX-License-Identifier: Apache-2.0

// Command client calls gRPC methods over a unix socket with grpc-go, dialled the way
// containerd's Go clients dial theirs: the target "unix://<socket>" with a context dialer
// (grpc-go then sends "localhost" as the :authority of every request).
//
// Usage: client SOCKET
//
// Each line on stdin is "<full method name> [<request bytes, hex>]"; the request bytes go out
// as they are (a raw codec under the "proto" name), and for each line it prints
// "OK <response bytes, hex>" or "ERR <gRPC code number> <message, hex>". The caller encodes and
// decodes the messages, so this client needs no generated code.
package main

import (
	"bufio"
	"context"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
)

// rawCodec passes message bytes through unchanged.
type rawCodec struct{}

func (rawCodec) Marshal(v interface{}) ([]byte, error) { return *(v.(*[]byte)), nil }

func (rawCodec) Unmarshal(data []byte, v interface{}) error {
	p := v.(*[]byte)
	*p = append((*p)[:0], data...)
	return nil
}

func (rawCodec) Name() string { return "proto" }

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: client SOCKET")
		os.Exit(2)
	}
	socket := os.Args[1]
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	conn, err := grpc.DialContext(ctx, "unix://"+socket,
		grpc.WithInsecure(),
		grpc.WithBlock(),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", strings.TrimPrefix(addr, "unix://"))
		}))
	cancel()
	if err != nil {
		fmt.Fprintf(os.Stderr, "dial %s: %v\n", socket, err)
		os.Exit(1)
	}
	defer conn.Close()
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 1<<20)
	for in.Scan() {
		fields := strings.Fields(in.Text())
		if len(fields) == 0 {
			continue
		}
		req := []byte{}
		if len(fields) > 1 {
			if req, err = hex.DecodeString(fields[1]); err != nil {
				fmt.Fprintf(os.Stderr, "bad hex: %v\n", err)
				os.Exit(2)
			}
		}
		var resp []byte
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		err := conn.Invoke(ctx, fields[0], &req, &resp, grpc.ForceCodec(rawCodec{}))
		cancel()
		if err != nil {
			s, _ := status.FromError(err)
			fmt.Printf("ERR %d %s\n", s.Code(), hex.EncodeToString([]byte(s.Message())))
		} else {
			fmt.Printf("OK %s\n", hex.EncodeToString(resp))
		}
	}
}
