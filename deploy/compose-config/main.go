// Command compose-config loads a compose file as `docker compose config` does, with the same
// library (compose-go): schema validation, ${VAR:-default} interpolation, YAML anchors and
// merge keys, x- extensions, every profile. It prints the resolved project as YAML, or the
// reason the file is invalid (exit status 1). It needs no Docker engine: the tests use it where
// the Compose plugin is missing. Usage: compose-config docker-compose.yml [OVERLAY.yml ...] (later files
// merge into earlier ones, as `docker compose -f A -f B` does).
package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/compose-spec/compose-go/v2/cli"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: compose-config COMPOSE_FILE [OVERLAY_FILE ...]")
		os.Exit(2)
	}
	var files []string
	for _, name := range os.Args[1:] {
		file, err := filepath.Abs(name)
		if err != nil {
			fail(err)
		}
		files = append(files, file)
	}
	options, err := cli.NewProjectOptions(files, cli.WithOsEnv,
		cli.WithWorkingDirectory(filepath.Dir(files[0])), cli.WithProfiles([]string{"*"}))
	if err != nil {
		fail(err)
	}
	project, err := options.LoadProject(context.Background())
	if err != nil {
		fail(err)
	}
	out, err := project.MarshalYAML()
	if err != nil {
		fail(err)
	}
	os.Stdout.Write(out)
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "compose-config:", err)
	os.Exit(1)
}
